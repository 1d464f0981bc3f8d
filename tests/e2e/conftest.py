"""The end-to-end tests' marker and report: their figures are printed at the end of the run (pytest -s or not)."""

from __future__ import annotations

import pytest

REPORT = pytest.StashKey[list[str]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: brings the whole stack up with `make demo` on a temporary home (~10 min)")
    config.stash[REPORT] = []


@pytest.fixture(scope="session")
def e2e_report(request: pytest.FixtureRequest) -> list[str]:
    """Lines for the terminal summary."""
    return request.config.stash[REPORT]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    lines = config.stash.get(REPORT, [])
    if lines:
        terminalreporter.section("TrafficWatch end to end: freshness, memory, timings")
        for line in lines:
            terminalreporter.write_line(line)
