"""Airflow's processes keep the pages they share with the processes they fork shared through their garbage
collections: the scheduler with its task slots (trafficwatch.executor.FrozenLocalExecutor, where Airflow's
LocalExecutor does not), the triggerer with its trigger runner (trafficwatch.airflow_plugin, a listener that
freezes when an Airflow job is created).

Each case runs in a process of its own (it forks, and freezes that process's garbage collector): it makes a heap
of objects, as a component's start-up does, forks as the component does, then runs a full collection in the
parent, and reports how much of the child's memory became its own (private dirty pages) meanwhile.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PRELUDE = """
import gc, json, os, sys, time
from trafficwatch.operate import _proc_bytes

def private_dirty_mib(pid):
    return _proc_bytes(pid, "smaps_rollup", "Private_Dirty:") / 2**20

def settled_private_dirty_mib(pid):  # once the child waits: two reads 0.2 s apart within 0.25 MiB
    last = private_dirty_mib(pid)
    for _ in range(50):
        time.sleep(0.2)
        now = private_dirty_mib(pid)
        if abs(now - last) < 0.25:
            break
        last = now
    return now

def copied_by_a_collection(child):  # a page it writes to is copied for the parent: the child's copy is then its own
    before = settled_private_dirty_mib(child)
    gc.collect()
    return private_dirty_mib(child) - before

heap = [[i] for i in range(400_000)]  # objects the garbage collector tracks, spread over ~75 MiB of pages
"""

EXECUTOR = """
from airflow.executors.local_executor import LocalExecutor
from trafficwatch.executor import FrozenLocalExecutor

executor = {"airflow": LocalExecutor, "trafficwatch": FrozenLocalExecutor}[sys.argv[1]](parallelism=1)
executor.start()
try:
    slot = next(iter(executor.workers))
    frozen = gc.get_freeze_count()
    copied = copied_by_a_collection(slot)
    executor._spawn_workers_with_gc_freeze(1)  # how sync() forks a slot in place of one that died...
    executor.sync()  # ... then the scheduler's loop goes on
    forked_again = len(executor.workers) == 2
    print("RESULT", json.dumps({"frozen": frozen, "copied_mib": copied, "forked_again": forked_again,
                                "frozen_after_sync": gc.get_freeze_count()}))
finally:
    executor.end()
"""

# The triggerer creates its job (Airflow calls the listeners' on_starting there), then forks its trigger runner
# with a bare os.fork (airflow.sdk.execution_time.supervisor.WatchedSubprocess.start).
TRIGGERER = """
from airflow.jobs.job import Job
from airflow.listeners.listener import get_listener_manager

listeners = [type(listener).__name__ for listener in get_listener_manager().pm.get_plugins()]
if sys.argv[1] == "job":
    Job()
frozen = gc.get_freeze_count()
runner = os.fork()
if runner == 0:
    time.sleep(60)
    os._exit(0)
try:
    copied = copied_by_a_collection(runner)
finally:
    os.kill(runner, 9)
    os.waitpid(runner, 0)
print("RESULT", json.dumps({"listeners": listeners, "frozen": frozen, "copied_mib": copied}))
"""


def run_case(script: str, case: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + script, case], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]  # Airflow logs there too
    return json.loads(result.removeprefix("RESULT "))


@pytest.fixture(scope="module")
def executors() -> dict[str, dict[str, float]]:
    return {executor: run_case(EXECUTOR, executor) for executor in ("airflow", "trafficwatch")}


@pytest.fixture(scope="module")
def triggerers() -> dict[str, dict[str, float]]:
    return {case: run_case(TRIGGERER, case) for case in ("job", "no job")}


def test_airflows_executor_lets_a_collection_copy_the_slots_pages(executors: dict[str, dict[str, float]]) -> None:
    assert executors["airflow"]["frozen"] == 0, executors  # unfrozen after the fork
    assert executors["airflow"]["copied_mib"] >= 20, executors  # most of the heap's pages now the slot's own
    assert executors["airflow"]["forked_again"] and executors["airflow"]["frozen_after_sync"] == 0, executors


def test_the_frozen_executor_keeps_the_slots_pages_shared(executors: dict[str, dict[str, float]]) -> None:
    assert executors["trafficwatch"]["frozen"] >= 400_000, executors  # the heap, among others
    assert executors["trafficwatch"]["copied_mib"] <= 5, executors
    assert executors["trafficwatch"]["forked_again"], executors
    assert executors["trafficwatch"]["frozen_after_sync"] >= 400_000, executors  # again once a slot is forked again


def test_the_plugin_freezes_when_a_job_is_created(triggerers: dict[str, dict[str, float]]) -> None:
    assert "FreezeAtJobStart" in triggerers["job"]["listeners"], triggerers  # loaded from the package's entry point
    assert triggerers["no job"]["frozen"] == 0, triggerers
    assert triggerers["job"]["frozen"] >= 400_000, triggerers


def test_a_task_process_starting_neither_freezes_nor_imports_airflows_orm() -> None:
    script = """
import gc, json, sys
from airflow.sdk.execution_time.task_runner import TaskRunnerMarker
from airflow.sdk.listener import get_listener_manager

get_listener_manager().hook.on_starting(component=TaskRunnerMarker())  # as the task runner does at its start
print("RESULT", json.dumps({"frozen": gc.get_freeze_count(), "orm": "airflow.jobs.job" in sys.modules}))
"""
    assert run_case(script, "task") == {"frozen": 0, "orm": False}


def test_a_forked_runner_keeps_its_pages_shared_once_a_job_froze_them(triggerers: dict[str, dict[str, float]]) -> None:
    assert triggerers["no job"]["copied_mib"] >= 20, triggerers  # Airflow's triggerer without the plugin
    assert triggerers["job"]["copied_mib"] <= 5, triggerers
