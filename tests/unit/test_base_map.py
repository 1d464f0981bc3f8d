"""The maps' base map follows TRAFFICWATCH_BASE_MAP: OpenStreetMap's tiles by default, none offline.

superset/bootstrap.py needs only the standard library and PyYAML at import (Superset is imported inside
its functions), so its bundle is checked here without Superset.
"""

from __future__ import annotations

import importlib.util
import io
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHARTS = REPO / "superset" / "bundle" / "charts"


def load_bootstrap():
    spec = importlib.util.spec_from_file_location("tw_superset_bootstrap", REPO / "superset" / "bootstrap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bootstrap = load_bootstrap()


def zipped_charts(serving_db: Path) -> dict[str, dict]:
    with zipfile.ZipFile(io.BytesIO(bootstrap.bundle_zip(serving_db))) as archive:
        return {
            Path(name).stem: yaml.safe_load(archive.read(name))
            for name in archive.namelist()
            if Path(name).parent.name == "charts"
        }


def map_styles(charts: dict[str, dict]) -> dict[str, str]:
    return {
        name: chart["params"]["mapbox_style"] for name, chart in charts.items() if "mapbox_style" in chart["params"]
    }


def test_the_bundle_maps_are_on_openstreetmap_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TRAFFICWATCH_BASE_MAP", raising=False)
    styles = map_styles(zipped_charts(tmp_path / "traffic.duckdb"))
    assert set(styles) == {"map_traffic_status", "map_speed_ratio"}
    assert set(styles.values()) == {bootstrap.BASE_MAPS["osm"]}
    # The YAML files themselves hold the default: their text goes into the ZIP unchanged.
    with zipfile.ZipFile(io.BytesIO(bootstrap.bundle_zip(tmp_path / "traffic.duckdb"))) as archive:
        for name in styles:
            entry = f"{bootstrap.BUNDLE_ROOT}/charts/{name}.yaml"
            assert archive.read(entry).decode() == (CHARTS / f"{name}.yaml").read_text()


def test_offline_the_maps_have_no_base_map_and_keep_everything_else(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TRAFFICWATCH_BASE_MAP", "osm")
    online = zipped_charts(tmp_path / "traffic.duckdb")
    monkeypatch.setenv("TRAFFICWATCH_BASE_MAP", "none")
    offline = zipped_charts(tmp_path / "traffic.duckdb")

    assert set(map_styles(offline).values()) == {""}
    assert online.keys() == offline.keys()
    for name, chart in online.items():
        expected = {**chart, "params": {**chart["params"]}}
        if "mapbox_style" in chart["params"]:
            expected["params"]["mapbox_style"] = ""
        assert offline[name] == expected, name  # the colours, tooltips and the rest: unchanged


def test_an_unknown_base_map_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRAFFICWATCH_BASE_MAP", "mapbox")
    with pytest.raises(SystemExit, match=r"TRAFFICWATCH_BASE_MAP must be one of osm, none, not 'mapbox'"):
        bootstrap.bundle_zip(tmp_path / "traffic.duckdb")
