"""The column-wise patch of a mart with stable wide columns (segment_latest's geometry) in the publish."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from trafficwatch import serving

MART = serving.Mart("segment_latest", key="segment_key", stable=("geometry_geojson", "path_json"))
COLUMNS = "segment_key VARCHAR, speed_kmh DOUBLE, traffic_status VARCHAR, geometry_geojson VARCHAR, path_json VARCHAR"


def rows_of(con: duckdb.DuckDBPyConnection, catalog: str) -> list[tuple]:
    return con.execute(f"SELECT * FROM {catalog}.main.segment_latest ORDER BY segment_key").fetchall()


@pytest.fixture
def attached(tmp_path: Path):
    """A warehouse and a previous serving file, attached as the publish attaches them."""
    warehouse, served = tmp_path / "traffic.duckdb", tmp_path / "serving.duckdb"
    previous = [
        ("a", 30.0, "freeFlow", '{"line": "a"}', "[[0, 0]]"),
        ("b", 20.0, "heavy", '{"line": "b"}', "[[1, 1]]"),
        ("c", 10.0, "congested", '{"line": "c"}', "[[2, 2]]"),
    ]
    with duckdb.connect(str(served)) as con:
        con.execute(f"CREATE TABLE segment_latest ({COLUMNS})")
        con.executemany("INSERT INTO segment_latest VALUES (?, ?, ?, ?, ?)", previous)
    current = [
        ("a", 31.0, "freeFlow", '{"line": "a"}', "[[0, 0]]"),  # new values, same geometry
        ("b", 5.0, "congested", '{"line": "b2"}', "[[1, 1]]"),  # geometry changed (a new segment version)
        ("d", None, "unknown", '{"line": "d"}', None),  # a new segment; c left
    ]
    with duckdb.connect(str(warehouse)) as con:
        con.execute(f"CREATE TABLE segment_latest ({COLUMNS})")
        con.executemany("INSERT INTO segment_latest VALUES (?, ?, ?, ?, ?)", current)
    con = duckdb.connect(":memory:")
    con.execute(f"ATTACH '{warehouse}' AS {serving.WAREHOUSE_NAME} (READ_ONLY)")
    con.execute(f"ATTACH '{served}' AS serving")
    yield con
    con.close()


def test_the_patched_mart_equals_the_warehouse(attached) -> None:
    assert serving._patch_columns(attached, MART)
    assert rows_of(attached, "serving") == rows_of(attached, serving.WAREHOUSE_NAME)
    assert [row[0] for row in rows_of(attached, "serving")] == ["a", "b", "d"]


def test_a_column_added_to_the_mart_asks_for_a_whole_copy(attached) -> None:
    attached.execute("ALTER TABLE serving.main.segment_latest DROP COLUMN path_json")
    assert not serving._patch_columns(attached, MART)
