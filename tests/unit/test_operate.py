"""`make down` underneath: every service of a home stopped by its process group, whatever it spawned."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from tests.support.freshness import percentile
from trafficwatch import operate, services

# A service whose child ignores SIGTERM, as Airflow standalone's children outlive a plain SIGTERM.
STUBBORN = (
    "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "time.sleep(600)']); time.sleep(600)"
)
PLAIN = "import time; time.sleep(600)"
# A service whose child leads a process group of its own, as every Airflow task process does.
GROUP_OF_ITS_OWN = (
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], process_group=0); time.sleep(600)"
)


def _start(home: Path, name: str, script: str) -> int:
    return services.start(services.Service(name, [sys.executable, "-c", script], lambda: True, ""), home)


def test_stop_all_stops_every_service_of_the_home_and_leaves_no_process(tmp_path: Path) -> None:
    groups = {name: _start(tmp_path, name, script) for name, script in (("s3", PLAIN), ("airflow", STUBBORN))}
    (tmp_path / "run" / "crashed.pid").write_text("4194303")  # a service that died without its pid file
    assert all(operate.group_members(pgid) for pgid in groups.values())

    stopped = operate.stop_all(tmp_path, timeout_s=2)

    assert stopped == {"airflow": True, "crashed": False, "s3": True}
    assert list(stopped) == ["airflow", "crashed", "s3"], "Airflow before the others, S3 last"
    assert not list((tmp_path / "run").glob("*.pid"))
    assert not [pid for pgid in groups.values() for pid in operate.group_members(pgid)]


def test_stack_memory_counts_every_process_of_the_groups(tmp_path: Path) -> None:
    pgid = _start(tmp_path, "airflow", STUBBORN)
    try:
        deadline = time.monotonic() + 10
        while len(operate.group_members(pgid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        memory = operate.stack_memory(tmp_path)
        assert memory.processes == 2
        assert memory.rss_bytes == memory.per_service_rss["airflow"] > 2 * 2**20
        assert 0 < memory.pss_bytes == memory.per_service_pss["airflow"] <= memory.rss_bytes
    finally:
        operate.stop_all(tmp_path, timeout_s=2)


def test_stack_memory_counts_the_processes_in_groups_of_their_own(tmp_path: Path) -> None:
    sid = _start(tmp_path, "airflow", GROUP_OF_ITS_OWN)
    try:
        deadline = time.monotonic() + 30
        # The child leaves the group between its fork and its exec: wait until it has.
        while (len(operate.session_members(sid)), len(operate.group_members(sid))) != (2, 1):
            assert time.monotonic() < deadline, "the child never started in a group of its own"
            time.sleep(0.1)
        assert operate.stack_memory(tmp_path).processes == 2
    finally:
        for pid in operate.session_members(sid):  # stop_all stops the service's group, not the child's
            os.kill(pid, signal.SIGKILL)
        operate.stop_all(tmp_path, timeout_s=2)


def test_percentile_interpolates_between_ranks() -> None:
    values = [float(v) for v in range(1, 21)]
    assert percentile(values, 50) == 10.5
    assert percentile(values, 95) == 19.05
    assert percentile([3.0], 95) == 3.0
