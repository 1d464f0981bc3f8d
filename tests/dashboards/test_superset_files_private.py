"""Superset's files (its SQLite metadata with the users' password hashes, caches, uploads) are its owner's
only: its data directory is 0700 and no file in it can be read by others, the metadata database included
(SQLite would create it 0644 under the usual umask; Superset here runs under the test session's)."""

from __future__ import annotations

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
