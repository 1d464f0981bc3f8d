"""The worker's one call path: a failure is raised as the same exception whether the worker or this process
did the work (the worker's side runs here, its answer through JSON as over the socket)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from trafficwatch import errors, lake, serving, worker
from trafficwatch.config import ConfigError, Settings, load_settings


class NeedsTwoArguments(Exception):
    """An exception the requester cannot rebuild from its arguments."""

    def __init__(self, what: str, where: str) -> None:
        super().__init__(f"{what} at {where}")


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Settings:
    monkeypatch.setenv("TRAFFICWATCH_HOME", str(tmp_path))
    return load_settings()


def _through(kept: worker.Worker, where: str) -> Any:
    """`worker._ask` answered by `kept` (the worker's side, in this process), or by nobody (work here)."""

    def ask(settings: Settings, op: str, **arguments: Any) -> dict[str, Any] | None:
        if where == "here":
            return None
        return json.loads(json.dumps(kept.answer({"op": op, **worker.lake_identity(settings), **arguments})))

    return ask


def _raised(monkeypatch, kept, where: str, call) -> BaseException:
    monkeypatch.setattr(worker, "_ask", _through(kept, where))
    with pytest.raises(Exception) as raised:
        call()
    return raised.value


@pytest.mark.parametrize(
    "failure",
    [ConfigError("TRAFFICWATCH_HTTP_TIMEOUT='soon' is not a number"), KeyError("segment_key"), OSError(28, "full")],
)
def test_a_failing_merge_raises_the_same_exception_from_the_worker_and_here(monkeypatch, settings, failure) -> None:
    def merge(*args: Any, **kwargs: Any) -> lake.MergeResult:
        raise failure

    monkeypatch.setattr(lake, "merge_pending", merge)
    kept = worker.Worker(settings)
    monkeypatch.setattr(kept.tables, "get", lambda *names: {})
    from_worker = _raised(monkeypatch, kept, "worker", lambda: worker.merge_pending(settings))
    here = _raised(monkeypatch, kept, "here", lambda: worker.merge_pending(settings))
    assert type(from_worker) is type(here) is type(failure)
    assert from_worker.args == here.args
    line = errors.failure("merge", here, settings)
    if isinstance(failure, ConfigError):  # the work's own failure: the same line
        assert errors.failure("merge", from_worker, settings) == line
    else:  # an unexpected one: its traceback is in the worker's log, and the line says so
        assert errors.failure("merge", from_worker, settings) == f"{line} ({worker.WORKER_NOTE})"


def test_failed_data_tests_come_back_with_their_tests(monkeypatch, settings) -> None:
    def build(*args: Any, **kwargs: Any) -> serving.BuildResult:
        raise serving.DataTestsFailed("2 data tests failed", ["not_null_a", "unique_b"])

    monkeypatch.setattr(serving, "build", build)
    kept = worker.Worker(settings)
    for where in ("worker", "here"):
        error = _raised(monkeypatch, kept, where, lambda: worker.build_marts(settings, full_refresh=True))
        assert type(error) is serving.DataTestsFailed
        assert (str(error), error.tests) == ("2 data tests failed", ["not_null_a", "unique_b"])


def test_an_exception_that_cannot_be_rebuilt_comes_back_as_a_worker_error(monkeypatch, settings) -> None:
    def merge(*args: Any, **kwargs: Any) -> lake.MergeResult:
        raise NeedsTwoArguments("disk full", "/tmp")

    monkeypatch.setattr(lake, "merge_pending", merge)
    kept = worker.Worker(settings)
    monkeypatch.setattr(kept.tables, "get", lambda *names: {})
    error = _raised(monkeypatch, kept, "worker", lambda: worker.merge_pending(settings))
    assert type(error) is worker.WorkerError
    assert str(error) == f"NeedsTwoArguments: disk full at /tmp ({worker.WORKER_NOTE})"
