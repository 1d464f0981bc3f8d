"""Superset holds each published serving file open, and only while it is the one published
(superset_config._HeldServingFile).

The case runs in Superset's own environment, in a process of its own (the holder listens to every SQLAlchemy
dialect's connections): engines are made as Superset makes them for a query (NullPool, the serving database's
connect_args from superset/bundle/databases/), one per query, over a small DuckDB file that is then replaced
with os.replace as the pipeline's publish does. test_serving_file_swap.py checks the same swap through a real
Superset's chart data API.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.dashboards.conftest import REPO, SUPERSET_PYTHON

pytestmark = pytest.mark.dashboards

DATABASE_YAML = REPO / "superset" / "bundle" / "databases" / "trafficwatch_serving.yaml"

SCRIPT = """
import importlib.util, json, os, sys
import duckdb
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

spec = importlib.util.spec_from_file_location("superset_config", sys.argv[1])
config = importlib.util.module_from_spec(spec)
spec.loader.exec_module(config)
served, connect_args = sys.argv[2], json.loads(sys.argv[3])
holder = config._HeldServingFile()
holder.install()

def publish(value):
    staged = served + ".staged"
    with duckdb.connect(staged) as con:
        con.execute("CREATE SCHEMA health")
        con.execute("CREATE TABLE main.t AS SELECT ? AS v", [value])
        con.execute("CREATE VIEW health.v AS SELECT v * 10 AS v FROM main.t")
    os.replace(staged, served)

def engine(path=served, args=connect_args):
    return create_engine(f"duckdb:///{path}", poolclass=NullPool, connect_args=args)

def query(sql, path=served, args=connect_args):
    with engine(path, args).connect() as connection:
        return connection.execute(text(sql)).fetchall()

def refused(sql):
    try:
        query(sql)
    except Exception as error:
        return str(error).splitlines()[0]
    return None

out = {}
publish(1)
out["first"] = [query("SELECT v FROM t")[0][0] for _ in range(5)]
out["view"] = query("SELECT v FROM health.v")[0][0]
out["opened_first"] = holder.opened
running = engine().raw_connection()  # a query still running on the first file when it is replaced
cursor = running.cursor()
publish(2)
out["second"] = [query("SELECT v FROM t")[0][0] for _ in range(3)]
out["opened_second"] = holder.opened
cursor.execute("SELECT v FROM t")
out["running_reads"] = cursor.fetchall()[0][0]
running.close()
out["read_file"] = refused("SELECT * FROM read_text('/etc/hostname')")
out["unlock"] = refused("SET enable_external_access = true")
out["write"] = refused("CREATE TABLE main.w AS SELECT 1 AS v")
other = os.path.join(os.path.dirname(served), "other.duckdb")
with duckdb.connect(other) as con:
    con.execute("CREATE TABLE t AS SELECT 7 AS v")
out["writable"] = query("SELECT v FROM t", other, {})[0][0]  # another shape: duckdb_engine's own connection
out["opened_last"] = holder.opened
print(json.dumps(out))
"""


def test_the_serving_file_is_held_per_version_and_a_replaced_one_is_read_at_once(tmp_path: Path) -> None:
    connect_args = yaml.safe_load(DATABASE_YAML.read_text())["extra"]["engine_params"]["connect_args"]
    # As Superset's DuckDB engine spec hands them to the engine: with its user agent added to the config.
    connect_args["config"]["custom_user_agent"] = "apache-superset/6.1.0"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPERSET_", "TRAFFICWATCH_"))}
    done = subprocess.run(
        [str(SUPERSET_PYTHON), "-c", SCRIPT, str(REPO / "superset" / "superset_config.py"),
         str(tmp_path / "traffic.duckdb"), json.dumps(connect_args)],
        env={**env, "TRAFFICWATCH_HOME": str(tmp_path), "SUPERSET_SECRET_KEY": os.urandom(32).hex()},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    # Five queries, five engines (as Superset makes them): one file opened.
    assert out["first"] == [1] * 5 and out["view"] == 10
    assert out["opened_first"] == 1
    # Replaced: the next query reads the new file, which is opened once more; a query that was running on the
    # old one still reads it.
    assert out["second"] == [2] * 3 and out["opened_second"] == 2
    assert out["running_reads"] == 1
    # The held file keeps the database's settings: no local file read, no unlocking them, no write.
    assert out["read_file"] and "file system operations are disabled" in out["read_file"], out["read_file"]
    assert out["unlock"] and "configuration has been locked" in out["unlock"], out["unlock"]
    assert out["write"] and "read-only mode" in out["write"], out["write"]
    # Any other connection is duckdb_engine's own.
    assert out["writable"] == 7 and out["opened_last"] == 2
