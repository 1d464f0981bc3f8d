"""The thinning of the maps' paths (dbt_project/macros/geometry.sql, used by segment_latest): which points go,
which stay, and how far the path drawn may move. The macro is rendered as dbt renders it (Jinja) and run in
DuckDB on made-up paths; tests/marts/test_marts_build.py checks the same bounds on the real network."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import duckdb
import jinja2
import pytest

MACROS = Path(__file__).resolve().parents[2] / "dbt_project" / "macros" / "geometry.sql"
METRES_PER_DEGREE_LAT = 110_540.0
LAT = 48.11
METRES_PER_DEGREE_LON = 111_320.0 * math.cos(math.radians(LAT))


def thinned(path_m: list[tuple[float, float]], passes: int = 2) -> list[tuple[float, float]]:
    """The points of one path (x, y in metres east and north of a point of Rennes) left after `passes`."""
    macros = jinja2.Environment().from_string(MACROS.read_text()).module
    points = [
        ("s", 1, i, -1.68 + x / METRES_PER_DEGREE_LON, LAT + y / METRES_PER_DEGREE_LAT)
        for i, (x, y) in enumerate(path_m)
    ]
    con = duckdb.connect()
    con.execute("CREATE TABLE p0 (segment_key VARCHAR, part_no INTEGER, point_no INTEGER, lon DOUBLE, lat DOUBLE)")
    con.executemany("INSERT INTO p0 VALUES (?, ?, ?, ?, ?)", points)
    for n in range(passes):
        con.execute(f"CREATE TABLE p{n + 1} AS {macros.thinning_pass(f'p{n}', 0.5)}")
    rows = con.execute(f"SELECT lon, lat FROM p{passes} ORDER BY point_no").fetchall()
    return [
        (round((lon + 1.68) * METRES_PER_DEGREE_LON, 6), round((lat - LAT) * METRES_PER_DEGREE_LAT, 6))
        for lon, lat in rows
    ]


def metres_to_piece(p: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    qx, qy = b[0] - a[0], b[1] - a[1]
    length2 = qx * qx + qy * qy
    t = 0.0 if length2 == 0 else min(1.0, max(0.0, ((p[0] - a[0]) * qx + (p[1] - a[1]) * qy) / length2))
    return math.hypot(p[0] - a[0] - t * qx, p[1] - a[1] - t * qy)


def gap(path: list[tuple[float, float]], drawn: list[tuple[float, float]]) -> float:
    """The largest distance from a point of `path` to the path `drawn`."""
    return max(min(metres_to_piece(p, a, b) for a, b in itertools.pairwise(drawn)) for p in path)


def test_points_on_a_straight_line_go_and_the_ends_stay() -> None:
    line = [(10.0 * i, 0.0) for i in range(9)]
    drawn = thinned(line)
    assert drawn[0] == pytest.approx(line[0], abs=0.2) and drawn[-1] == pytest.approx(line[-1], abs=0.2)
    assert len(drawn) == 3  # 9 -> 5 -> 3: every other interior point, twice


def test_a_bend_beyond_half_a_metre_stays() -> None:
    assert len(thinned([(0.0, 0.0), (50.0, 0.7), (100.0, 0.0)], passes=1)) == 3
    assert len(thinned([(0.0, 0.0), (50.0, 0.3), (100.0, 0.0)], passes=1)) == 2


def test_a_point_out_and_back_or_beyond_the_piece_stays() -> None:
    # The path goes out to (30, 0) and comes back: the piece between its neighbours has no length.
    assert len(thinned([(0.0, 0.0), (30.0, 0.0), (0.0, 0.0)], passes=1)) == 3
    # On the line of its neighbours but past one end (a U-turn along the road): not on the piece.
    assert len(thinned([(0.0, 0.0), (40.0, 0.0), (20.0, 0.0)], passes=1)) == 3


def test_two_passes_move_a_curve_by_a_metre_at_most() -> None:
    # A gentle arc of radius 2 km sampled every 10 m: every point is within 0.5 m of its neighbours' chord.
    arc = [(2000 * math.sin(i / 200), 2000 * (1 - math.cos(i / 200))) for i in range(41)]
    once, twice = thinned(arc, passes=1), thinned(arc, passes=2)
    assert len(arc) > len(once) > len(twice)
    assert gap(arc, once) <= 0.5 + 0.01
    assert gap(arc, twice) <= 1.0 + 0.01
