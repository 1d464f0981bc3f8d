"""The scheduler's executor (trafficwatch.executor.FrozenLocalExecutor) keeps the pages it shares with its task
slots shared through the scheduler's garbage collections; Airflow's LocalExecutor does not.

Each case runs in a process of its own (the executor forks, and freezes that process's garbage collector): it
makes a heap of objects, as the scheduler's start-up does, starts the executor with one slot, then runs a full
collection, and reports how much of the slot's memory became its own (private dirty pages) meanwhile.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = """
import gc, json, sys, time
from airflow.executors.local_executor import LocalExecutor
from trafficwatch.executor import FrozenLocalExecutor
from trafficwatch.operate import _proc_bytes

def private_dirty_mib(pid):
    return _proc_bytes(pid, "smaps_rollup", "Private_Dirty:") / 2**20

def settled_private_dirty_mib(pid):  # once the slot waits for work: two reads 0.2 s apart within 0.25 MiB
    last = private_dirty_mib(pid)
    for _ in range(50):
        time.sleep(0.2)
        now = private_dirty_mib(pid)
        if abs(now - last) < 0.25:
            break
        last = now
    return now

heap = [[i] for i in range(400_000)]  # objects the garbage collector tracks, spread over ~75 MiB of pages
executor = {"airflow": LocalExecutor, "trafficwatch": FrozenLocalExecutor}[sys.argv[1]](parallelism=1)
executor.start()
try:
    slot = next(iter(executor.workers))
    before = settled_private_dirty_mib(slot)
    frozen = gc.get_freeze_count()
    gc.collect()  # a page it writes to is copied for the scheduler: the slot's copy is then its own
    copied = private_dirty_mib(slot) - before
    executor._spawn_workers_with_gc_freeze(1)  # how sync() forks a slot in place of one that died...
    executor.sync()  # ... then the scheduler's loop goes on
    forked_again = len(executor.workers) == 2
    print("RESULT", json.dumps({"frozen": frozen, "copied_mib": copied, "forked_again": forked_again,
                                "frozen_after_sync": gc.get_freeze_count()}))
finally:
    executor.end()
"""


def run_case(executor: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, executor], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]  # Airflow logs there too
    return json.loads(result.removeprefix("RESULT "))


@pytest.fixture(scope="module")
def cases() -> dict[str, dict[str, float]]:
    return {executor: run_case(executor) for executor in ("airflow", "trafficwatch")}


def test_airflows_executor_lets_a_collection_copy_the_slots_pages(cases: dict[str, dict[str, float]]) -> None:
    assert cases["airflow"]["frozen"] == 0, cases  # unfrozen after the fork
    assert cases["airflow"]["copied_mib"] >= 20, cases  # most of the heap's pages now the slot's own
    assert cases["airflow"]["forked_again"] and cases["airflow"]["frozen_after_sync"] == 0, cases


def test_the_frozen_executor_keeps_the_slots_pages_shared(cases: dict[str, dict[str, float]]) -> None:
    assert cases["trafficwatch"]["frozen"] >= 400_000, cases  # the heap, among others
    assert cases["trafficwatch"]["copied_mib"] <= 5, cases
    assert cases["trafficwatch"]["forked_again"], cases
    assert cases["trafficwatch"]["frozen_after_sync"] >= 400_000, cases  # frozen again once a slot is forked again
