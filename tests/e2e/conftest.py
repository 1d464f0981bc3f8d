"""The end-to-end tests' marker and report: their figures are printed at the end of the run (pytest -s or not).

Under pytest-xdist the tests run in a worker process and the summary is printed by the controlling one: the
lines travel with the test reports (a user property of each test's teardown report) to the summary in
tests/conftest.py, with or without workers.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest

from tests.conftest import E2E_REPORT_PROPERTY

REPORT = pytest.StashKey[list[str]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: brings the whole stack up with `make demo` on a temporary home (~10 min)")
    config.stash[REPORT] = []


@pytest.fixture(scope="session")
def e2e_report(request: pytest.FixtureRequest) -> list[str]:
    """Lines for the terminal summary."""
    return request.config.stash[REPORT]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport]:
    """The lines added since the last test (its module fixture's teardown included) go with its teardown report."""
    report = yield
    lines = item.config.stash[REPORT]
    if report.when == "teardown" and lines:
        report.user_properties.append((E2E_REPORT_PROPERTY, list(lines)))
        lines.clear()
    return report
