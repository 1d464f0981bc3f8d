"""Superset's files (its SQLite metadata with the users' password hashes, caches, uploads) are its owner's
only: its data directory is 0700 and no file in it can be read by others, the metadata database included
(SQLite would create it 0644 under the usual umask; Superset here runs under the test session's)."""

from __future__ import annotations

import sqlite3
import stat

import pytest

from .conftest import SupersetInstance

pytestmark = pytest.mark.dashboards


def test_superset_files_are_private(superset: SupersetInstance) -> None:
    data_dir = superset.metadata_db.parent
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert superset.metadata_db.stat().st_size > 0  # migrated: the file Superset really uses
    files = [path for path in data_dir.rglob("*") if path.is_file()]
    assert superset.metadata_db in files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path} is readable by others"


def test_the_metadata_database_logs_ahead_in_private_files(superset: SupersetInstance) -> None:
    """superset_config.py puts the SQLite metadata in WAL mode (no disk sync per event-log commit): the log
    and shared-memory files SQLite then keeps beside it while Superset runs hold the same rows, so they are
    private too."""
    beside = [superset.metadata_db.with_name(superset.metadata_db.name + suffix) for suffix in ("-wal", "-shm")]
    for path in beside:  # before this test's own connection, whose close could checkpoint and remove them
        assert path.exists(), f"{path} is missing: Superset's pooled connections keep it"
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path} is readable by others"
    con = sqlite3.connect(superset.metadata_db)
    try:
        (mode,) = con.execute("PRAGMA journal_mode").fetchone()
    finally:
        con.close()
    assert mode == "wal"
