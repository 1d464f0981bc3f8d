"""The dashboards read the serving file's tables and views by name: every dataset of the Superset bundle
names one that every publish makes (`serving.DASHBOARD_VIEWS`), with the columns and metrics it declares,
and a publish brings a previous file's views to this code's definitions."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml

from tests.conftest import REPO, land_raw, redated
from tests.marts.fixtures import pipeline_settings, serving_config
from trafficwatch import lake, serving

pytestmark = pytest.mark.integration

DATASETS = REPO / "superset" / "bundle" / "datasets"


def bundle_datasets() -> list[dict[str, Any]]:
    return [yaml.safe_load(path.read_text()) for path in sorted(DATASETS.glob("*.yaml"))]


def views_of(path: Path) -> dict[str, str]:
    """The serving file's views, by schema-qualified name, with their SQL as DuckDB keeps it."""
    with duckdb.connect(str(path), read_only=True) as con:
        rows = con.execute("SELECT schema_name || '.' || view_name, sql FROM duckdb_views() WHERE NOT internal")
        return dict(rows.fetchall())


def defined_views() -> set[str]:
    return {f"{sql.parent.name}.{sql.stem}" for sql in serving.DASHBOARD_VIEWS.glob("*/*.sql")}


def test_every_dataset_reads_a_relation_of_the_serving_file_with_its_columns_and_metrics(
    sample_serving_db: Path,
) -> None:
    datasets = bundle_datasets()
    marts = {f"main.{mart.name}" for mart in serving.MARTS}
    shared = {name for name in defined_views() if name.split(".")[1].startswith("_")}
    # What the datasets read that is not a mart is exactly the views every publish makes, but those the
    # views share, which some view reads.
    assert {f"{d['schema']}.{d['table_name']}" for d in datasets} - marts == defined_views() - shared != set()
    view_sql = " ".join(sql.read_text() for sql in serving.DASHBOARD_VIEWS.glob("*/*.sql"))
    assert all(f"JOIN {name} " in view_sql for name in shared)
    views = views_of(sample_serving_db)
    assert set(views) == defined_views()
    with duckdb.connect(str(sample_serving_db), read_only=True) as con:
        for dataset in datasets:
            relation = f"{dataset['schema']}.{dataset['table_name']}"
            # A dataset with SQL of its own is parsed again by Superset at every chart query.
            assert dataset["sql"] is None, f"{relation}: a dataset reads a table or view, not SQL of its own"
            held = {name for (name, *_) in con.execute(f"DESCRIBE {relation}").fetchall()}
            for column in dataset["columns"]:
                if column.get("expression"):
                    con.execute(f"SELECT {column['expression']} FROM {relation}").fetchall()
                else:
                    assert column["column_name"] in held, f"{relation}: no column {column['column_name']}"
            for metric in dataset["metrics"]:
                con.execute(f"SELECT {metric['expression']} FROM {relation}").fetchall()


def test_a_patched_publish_brings_the_views_to_this_code(s3_server: str, sample_bytes: bytes, tmp_path: Path) -> None:
    """A view changed or added in the previous serving file (an older release's definitions) is replaced or
    dropped by the next publish, which patches that file rather than copying the marts whole."""
    settings = pipeline_settings(s3_server, tmp_path)
    config = serving_config(settings)
    land_raw(settings, sample_bytes)
    lake.merge_pending(settings)
    first = serving.build(settings, config)
    expected = views_of(config.serving_db)
    assert set(expected) == defined_views()
    with duckdb.connect(str(config.serving_db)) as con:
        con.execute("CREATE OR REPLACE VIEW main.road_traffic_24h AS SELECT 1 AS road_name")
        con.execute("CREATE VIEW main.retired_view AS SELECT 1 AS x")
        con.execute("DROP VIEW health.pipeline_builds")
    previous = tmp_path / "previous.duckdb"
    shutil.copyfile(config.serving_db, previous)
    assert set(views_of(previous)) == defined_views() - {"health.pipeline_builds"} | {"main.retired_view"}

    land_raw(settings, redated(sample_bytes, 1))
    lake.merge_pending(settings)
    second = serving.build(settings, config)

    assert first.full_publish and not second.full_publish
    assert views_of(config.serving_db) == expected
    with duckdb.connect(str(config.serving_db), read_only=True) as con:
        (roads,) = con.execute("SELECT count(DISTINCT road_name) FROM main.road_traffic_24h").fetchone()
    assert roads > 100
