"""The `airflow` service's parent (trafficwatch.airflow_components) with a stand-in for the `airflow` command's
module: every component forked and named, its output prefixed with its name, all stopped by one SIGTERM or when
one exits; with Airflow preloaded, the components share its pages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from trafficwatch import airflow_components, operate, services

# A stand-in for `airflow.__main__`: its main() says which component it is, then waits; the triggerer exits at
# once if asked to.
FAKE_AIRFLOW = """
import os, sys, time

def main():
    print("component", " ".join(sys.argv[1:]), flush=True)
    if sys.argv[1] == "triggerer" and os.environ.get("FAKE_TRIGGERER_EXITS") == "message":
        sys.exit("the triggerer cannot reach its database")  # as the `airflow` command ends on some errors
    if sys.argv[1] == "triggerer" and os.environ.get("FAKE_TRIGGERER_EXITS"):
        sys.exit(3)
    time.sleep(600)
"""
# A module whose import starts a thread.
THREADED = (
    "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), name='poller', daemon=True).start()\n"
)
MIB = 2**20


def _fake_airflow(tmp_path: Path) -> dict[str, str]:
    """The environment in which `fake_airflow` (and `threaded`) can be imported."""
    (tmp_path / "fake_airflow.py").write_text(FAKE_AIRFLOW)
    (tmp_path / "threaded.py").write_text(THREADED)
    return {"PYTHONPATH": str(tmp_path)}


def _command(*preload: str) -> list[str]:
    return [sys.executable, "-m", "trafficwatch.airflow_components", "fake_airflow", *preload]


def _rollup(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value) * 1024
    return fields


def _components(pgid: int) -> dict[str, int]:
    """The forked components of the service group `pgid`, by process title."""
    titles = {}
    for pid in operate.group_members(pgid):
        if pid != pgid:
            titles[Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()] = pid
    return titles


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_every_component_runs_in_the_service_group_and_one_sigterm_stops_them_all(tmp_path: Path) -> None:
    service = services.Service("airflow", _command(), lambda: True, "", _fake_airflow(tmp_path))
    pgid = services.start(service, tmp_path)
    log = tmp_path / "logs" / "airflow.log"
    try:
        # The parent and its four components, in the service's process group.
        _wait_for(lambda: len(operate.group_members(pgid)) == 5)
        _wait_for(lambda: log.read_text().count("| component ") == 4)
        # Each named in `ps` as the `airflow` command it runs.
        titles = _components(pgid)
        assert sorted(titles) == sorted(f"airflow {' '.join(args)}" for args in airflow_components.COMPONENTS.values())
    finally:
        operate.stop_all(tmp_path, timeout_s=10)
    assert not operate.group_members(pgid)
    lines = log.read_text().splitlines()
    for name, args in airflow_components.COMPONENTS.items():
        assert f"{name:13} | component {' '.join(args)}" in lines
    assert "--skip-serve-logs" in airflow_components.COMPONENTS["scheduler"]
    assert "--skip-serve-logs" in airflow_components.COMPONENTS["triggerer"]
    assert lines[-1].endswith("| stopped")


def _until_the_triggerer_exits(tmp_path: Path, how: str) -> subprocess.CompletedProcess[str]:
    """The parent run to its end, its stand-in triggerer exiting at once (`how`: "message" for sys.exit with a
    message, anything else for code 3)."""
    return subprocess.run(
        _command(),
        env={**os.environ, **_fake_airflow(tmp_path), "FAKE_TRIGGERER_EXITS": how},
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
        check=False,
    )


def test_a_component_that_exits_stops_the_others_and_the_parent_fails(tmp_path: Path) -> None:
    done = _until_the_triggerer_exits(tmp_path, "code")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "triggerer exited with code 3: stopping the others" in done.stdout
    assert done.stdout.rstrip().endswith("| stopped")


def test_a_component_that_exits_with_a_message_shows_it_under_its_name(tmp_path: Path) -> None:
    done = _until_the_triggerer_exits(tmp_path, "message")
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{'triggerer':13} | the triggerer cannot reach its database" in done.stdout.splitlines()
    assert "triggerer exited with code 1: stopping the others" in done.stdout


def test_sigterm_to_the_parent_alone_stops_the_components(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            _command(), stdout=out, start_new_session=True, env={**os.environ, **_fake_airflow(tmp_path)}
        )
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


def _private_and_shared(tmp_path: Path, preload: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Each component's private and shared memory, once all four run (a second after, for their pages to
    settle), with the `airflow` service's parent preloading `preload`."""
    home = tmp_path / ("preloaded" if preload else "bare")
    service = services.Service("airflow", _command(*preload), lambda: True, "", _fake_airflow(tmp_path))
    pgid = services.start(service, home)
    try:
        _wait_for(lambda: (home / "logs" / "airflow.log").read_text().count("| component ") == 4, timeout_s=60)
        time.sleep(1)
        memory = {}
        for title, pid in _components(pgid).items():
            rollup = _rollup(pid)
            memory[title] = {
                "private": rollup["Private_Clean"] + rollup["Private_Dirty"],
                "shared": rollup["Shared_Clean"] + rollup["Shared_Dirty"],
            }
        return memory
    finally:
        operate.stop_all(home, timeout_s=10)


def test_the_components_share_the_modules_the_parent_preloaded(tmp_path: Path) -> None:
    """With Airflow's modules preloaded (as the `airflow` service runs), each component holds them in pages it
    shares with the parent and the other components, not in pages of its own."""
    preloaded = _private_and_shared(tmp_path, airflow_components.PRELOAD)
    bare = _private_and_shared(tmp_path, ())
    assert len(preloaded) == len(bare) == 4, (preloaded, bare)
    for title, memory in preloaded.items():
        # Airflow's ~150 MiB of modules: shared; without them a component is a bare interpreter.
        assert memory["shared"] >= 100 * MIB, (title, memory)
        assert memory["private"] <= 20 * MIB, (title, memory)
        assert bare[title]["shared"] <= 20 * MIB, (title, bare[title])


def test_a_preloaded_module_that_starts_a_thread_stops_the_parent_before_any_fork(tmp_path: Path) -> None:
    """A fork copies only the thread that calls it: a preload that started a thread would leave the components
    with locks nobody releases. The parent refuses, naming the module and the thread."""
    done = subprocess.run(
        _command("threaded"),
        env={**os.environ, **_fake_airflow(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "importing threaded started threads (poller): cannot fork" in done.stderr
    assert "| component " not in done.stdout


def test_airflows_preloaded_modules_start_no_thread() -> None:
    """What the `airflow` service's parent imports before it forks (checked in a fresh interpreter)."""
    code = "import importlib, sys, threading\n"
    code += "for name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    code += "print(threading.active_count(), [t.name for t in threading.enumerate()])\n"
    modules = [airflow_components.AIRFLOW_MAIN, *airflow_components.PRELOAD]
    done = subprocess.run(
        [sys.executable, "-c", code, *modules], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "1 ['MainThread']", done.stdout + done.stderr[-2000:]
