"""The DuckDB extensions a build loads: installed from their wheels, signature checked once per file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trafficwatch import dbt_build


def _extension_file(directory: Path, name: str) -> Path:
    (path,) = directory.rglob(f"{name}.duckdb_extension")
    return path


def test_extensions_are_installed_and_their_signatures_checked(tmp_path: Path) -> None:
    directory = tmp_path / "extensions"
    dbt_build.ensure_extensions(directory)
    for name in dbt_build.EXTENSIONS:
        path = _extension_file(directory, name)
        assert any(key[0] == str(path) for key in dbt_build._VERIFIED), f"{name} was not checked"


def test_a_changed_extension_file_is_checked_again_and_refused(tmp_path: Path) -> None:
    directory = tmp_path / "extensions"
    dbt_build.ensure_extensions(directory)
    path = _extension_file(directory, "httpfs")
    # One byte flipped in the middle: the signature no longer matches. Written to a new file that replaces
    # the old one, as an install would: the old file is loaded in this process (its code is mapped from it),
    # and changing it in place would change code this process may still run.
    changed = bytearray(path.read_bytes())
    changed[len(changed) // 2] ^= 0xFF
    replacement = path.with_suffix(".changed")
    replacement.write_bytes(changed)
    os.replace(replacement, path)
    refused = r"the DuckDB httpfs extension .*httpfs\.duckdb_extension was refused"
    with pytest.raises(dbt_build.BuildError, match=refused):
        dbt_build.ensure_extensions(directory)
