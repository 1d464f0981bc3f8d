"""Serving settings and messages, without S3 or dbt."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from trafficwatch import dbt_build, serving
from trafficwatch.config import ConfigError, load_settings


def test_serving_file_defaults_under_home_and_follows_its_variable(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TRAFFICWATCH_HOME", str(tmp_path))
    monkeypatch.delenv("TRAFFICWATCH_SERVING_DB", raising=False)
    monkeypatch.delenv("TRAFFICWATCH_SERVING_DAYS", raising=False)
    config = serving.ServingConfig.from_env(load_settings())
    assert config.serving_db == tmp_path / "serving" / "traffic.duckdb"
    assert config.warehouse_db == tmp_path / "warehouse" / "traffic.duckdb"
    assert config.serving_days == 30

    monkeypatch.setenv("TRAFFICWATCH_SERVING_DB", str(tmp_path / "elsewhere" / "marts.duckdb"))
    monkeypatch.setenv("TRAFFICWATCH_SERVING_DAYS", "7")
    config = serving.ServingConfig.from_env(load_settings())
    assert (config.serving_db, config.serving_days) == (tmp_path / "elsewhere" / "marts.duckdb", 7)


@pytest.mark.parametrize("days", ["a week", "0", "2.5"])
def test_a_bad_serving_window_is_a_configuration_error(monkeypatch, days) -> None:
    monkeypatch.setenv("TRAFFICWATCH_SERVING_DAYS", days)
    with pytest.raises(ConfigError, match="TRAFFICWATCH_SERVING_DAYS"):
        serving.ServingConfig.from_env(load_settings())


def _result(name: str, kind: str, status: str, message: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(node=SimpleNamespace(name=name, resource_type=kind), status=status, message=message)


def test_the_failure_message_is_one_line_naming_failed_tests_and_models() -> None:
    message, tests = dbt_build._failure_message(
        [
            _result("segment_latest", "model", "success"),
            _result("unique_segment_latest_segment_key", "test", "fail", "Got 1 result"),
            _result("accepted_values_x", "test", "pass"),
            _result("not_null_y", "test", "error", "Runtime Error\n  boom"),
            _result("int_segment_15min", "model", "error", "Runtime Error in model int_segment_15min\n  IO Error: x"),
        ]
    )
    assert tests == ["not_null_y", "unique_segment_latest_segment_key"]
    assert "\n" not in message
    assert message == (
        "2 data test(s) failed: not_null_y, unique_segment_latest_segment_key; "
        "1 model(s) errored: int_segment_15min: Runtime Error in model int_segment_15min IO Error: x"
    )
