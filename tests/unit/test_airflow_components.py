"""The `airflow` service's parent (trafficwatch.airflow_components) with a stand-in `airflow` program: every
component started, its output prefixed with its name, all stopped by one SIGTERM or when one exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from trafficwatch import airflow_components, operate, services

# A stand-in `airflow`: says which component it is, then waits; the triggerer exits at once if asked to.
FAKE_AIRFLOW = """#!{python}
import os, sys, time
print("component", " ".join(sys.argv[1:]), flush=True)
if sys.argv[1] == "triggerer" and os.environ.get("FAKE_TRIGGERER_EXITS"):
    sys.exit(3)
time.sleep(600)
"""


def _fake_airflow(tmp_path: Path) -> Path:
    path = tmp_path / "airflow"
    path.write_text(FAKE_AIRFLOW.format(python=sys.executable))
    path.chmod(0o755)
    return path


def _command(fake: Path) -> list[str]:
    return [sys.executable, "-m", "trafficwatch.airflow_components", str(fake)]


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_every_component_runs_in_the_service_group_and_one_sigterm_stops_them_all(tmp_path: Path) -> None:
    fake = _fake_airflow(tmp_path)
    service = services.Service("airflow", _command(fake), lambda: True, "")
    pgid = services.start(service, tmp_path)
    log = tmp_path / "logs" / "airflow.log"
    try:
        # The parent and its four components, in the service's process group.
        _wait_for(lambda: len(operate.group_members(pgid)) == 5)
        _wait_for(lambda: log.read_text().count("| component ") == 4)
    finally:
        operate.stop_all(tmp_path, timeout_s=10)
    assert not operate.group_members(pgid)
    lines = log.read_text().splitlines()
    for name, args in airflow_components.COMPONENTS.items():
        assert f"{name:13} | component {' '.join(args)}" in lines
    assert "--skip-serve-logs" in airflow_components.COMPONENTS["scheduler"]
    assert "--skip-serve-logs" in airflow_components.COMPONENTS["triggerer"]
    assert lines[-1].endswith("| stopped")


def test_a_component_that_exits_stops_the_others_and_the_parent_fails(tmp_path: Path) -> None:
    fake = _fake_airflow(tmp_path)
    done = subprocess.run(
        _command(fake),
        env={**os.environ, "FAKE_TRIGGERER_EXITS": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "triggerer exited with code 3: stopping the others" in done.stdout
    assert done.stdout.rstrip().endswith("| stopped")


def test_sigterm_to_the_parent_alone_stops_the_components(tmp_path: Path) -> None:
    fake = _fake_airflow(tmp_path)
    log = tmp_path / "out.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(_command(fake), stdout=out, start_new_session=True)
    try:
        _wait_for(lambda: log.read_text().count("| component ") == 4)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0
    assert log.read_text().rstrip().endswith("| stopped")
    assert not operate.group_members(process.pid)
