"""Superset's full garbage collections wait for a moment without requests (superset_config._IdleCollector).

Each case runs in Superset's own environment, in a process of its own (the collector changes the process's
garbage collector settings): a small Flask app, given the collector as FLASK_APP_MUTATOR gives it Superset's,
serves a request that keeps many new objects alive, which is what makes CPython start a full collection on its
own. `gc.callbacks` records every full collection and how many requests were in flight when it started.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path

import pytest

from tests.dashboards.conftest import REPO, SUPERSET_PYTHON

pytestmark = pytest.mark.dashboards

SCRIPT = """
import gc, importlib.util, json, sys, time, weakref
from flask import Flask, request

spec = importlib.util.spec_from_file_location("superset_config", sys.argv[1])
config = importlib.util.module_from_spec(spec)
spec.loader.exec_module(config)
mode, max_pending, unfreeze_every_s = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])

app = Flask("idle_gc_check")
collector = config._IdleCollector()
collector.IDLE_S = 0.3
collector.MAX_PENDING = max_pending
collector.UNFREEZE_EVERY_S = unfreeze_every_s
# Of every full collection: seconds since the start, requests in flight, seconds it took, objects frozen then.
full = []
collected = []  # how many full collections the collector had finished (frozen their survivors) each time

def collect_and_note():
    collect()
    collected.append(len(full))

collect, collector.collect = collector.collect, collect_and_note

def note(phase, info):
    if info["generation"] != 2:
        return
    if phase == "start":
        full.append([round(time.monotonic() - started, 3), collector.in_flight, time.perf_counter(),
                     gc.get_freeze_count()])
    else:
        full[-1][2] = round(time.perf_counter() - full[-1][2], 4)

kept = []

@app.route("/work")
def work():
    if request.args.get("keep", "yes") == "no":  # cyclic garbage only: young collections, few survivors
        for _ in range(200_000):
            cycle = []
            cycle.append(cycle)
        return "done"
    for _ in range(40):  # objects that outlive the young generations, as a query's do
        kept.append([[] for _ in range(20_000)])
    deadline = time.monotonic() + 20
    while mode == "busy" and not full and time.monotonic() < deadline:  # a request that never ends...
        for _ in range(20_000):  # ... until a full collection comes (cyclic garbage: young collections go on)
            cycle = []
            cycle.append(cycle)
    return "done"

if mode == "plain":
    app.wsgi_app = collector.counted(app.wsgi_app)  # counted only: CPython's own rule decides
else:
    collector.install(app)
gc.collect()
started = time.monotonic()
gc.callbacks.append(note)

def serve_then_wait_for_idle_collection(keep="yes"):
    assert app.test_client().get(f"/work?keep={keep}").data == b"done"
    ended = round(time.monotonic() - started, 3)
    deadline = time.monotonic() + 20
    while mode in ("idle", "freeze") and time.monotonic() < deadline:
        # One that started after the request, and whose freeze is done: the script goes on only then, as
        # allocations made while a collection runs in the collector's thread start no young collection, and
        # so would not count towards the next full one.
        if [at for at, *_ in full if at >= ended] and collected and collected[-1] == len(full):
            break
        time.sleep(0.05)
    return ended

class Node:
    pass

node = Node()
node.loop = node  # alive now, frozen by the first collection, cyclic garbage after it
alive = weakref.ref(node)
ended = serve_then_wait_for_idle_collection()
if mode == "freeze":
    del node
    serve_then_wait_for_idle_collection(keep="no")  # enough for a second full collection, few survivors
print(json.dumps({"full": full, "ended": ended, "threshold": gc.get_threshold(),
                  "garbage_node_alive": alive() is not None}))
"""


def run_case(tmp_path: Path, mode: str, max_pending: int = 500, unfreeze_every_s: float = 900.0) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPERSET_", "TRAFFICWATCH_"))}
    env |= {"TRAFFICWATCH_HOME": str(tmp_path), "SUPERSET_SECRET_KEY": secrets.token_urlsafe(48)}
    done = subprocess.run(
        [str(SUPERSET_PYTHON), "-c", SCRIPT, str(REPO / "superset" / "superset_config.py"),
         mode, str(max_pending), str(unfreeze_every_s)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_without_the_collector_a_request_that_keeps_objects_pays_for_full_collections(tmp_path: Path) -> None:
    plain = run_case(tmp_path, "plain")
    assert [in_flight for _, in_flight, *_ in plain["full"]].count(1) >= 1, plain


def test_full_collections_wait_until_no_request_is_in_flight(tmp_path: Path) -> None:
    idle = run_case(tmp_path, "idle")
    assert idle["full"], idle  # the collector ran one once the request was over...
    assert all(in_flight == 0 for _, in_flight, *_ in idle["full"]), idle
    assert idle["full"][0][0] >= idle["ended"] + 0.3, idle  # ... and nothing in flight for IDLE_S
    assert idle["threshold"][2] >= 2**30  # CPython starts none on its own


def test_a_server_never_idle_still_collects_after_max_pending(tmp_path: Path) -> None:
    busy = run_case(tmp_path, "busy", max_pending=20)
    assert busy["full"] and busy["full"][0][1] == 1, busy  # in the middle of the request


def test_the_survivors_of_a_collection_are_left_out_of_the_next(tmp_path: Path) -> None:
    frozen = run_case(tmp_path, "freeze")
    (_, _, first_s, _), (_, _, second_s, frozen_then) = frozen["full"][:2]
    assert frozen_then >= 800_000, frozen  # the request's 800,000 kept objects, frozen after the first
    assert second_s < first_s / 3, frozen  # the second walks only what came after
    assert frozen["garbage_node_alive"], frozen  # cyclic garbage among the frozen waits for an unfreeze


def test_the_frozen_objects_are_walked_again_every_unfreeze_every_s(tmp_path: Path) -> None:
    walked = run_case(tmp_path, "freeze", unfreeze_every_s=0.0)  # every collection unfreezes first
    assert len(walked["full"]) >= 2, walked
    assert not walked["garbage_node_alive"], walked  # the cycle frozen by the first went in the second
