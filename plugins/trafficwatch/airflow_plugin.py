"""TrafficWatch's Airflow plugin (the `airflow.plugins` entry point of the package, pyproject.toml): one listener,
which leaves the objects an Airflow component holds when it starts its job frozen for the garbage collector.

Airflow's triggerer forks its trigger runner right after it creates its job, and neither process freezes:
each full collection in either one writes to the header of every object they share, and each page so
written is copied, so the two soon hold most of their start-up state twice. Freezing when the job is
created (`on_starting`, called by `Job()` in the scheduler, the dag-processor and the triggerer) keeps those
pages shared; objects made afterwards are collected as usual. The scheduler (`trafficwatch.executor`) and
the dag-processor (Airflow itself) freeze again when they fork, so the triggerer is the one this changes.
What it costs: cyclic garbage among the objects that existed at that moment (module-level state, made once)
is never reclaimed.
"""

from __future__ import annotations

import gc
import sys
from typing import Any, ClassVar

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin


class FreezeAtJobStart:
    """The listener: `gc.freeze()` when an Airflow job (a scheduler, dag-processor or triggerer) is created."""

    @hookimpl
    def on_starting(self, component: Any) -> None:
        # Task processes call this too (with a marker): they have not imported Airflow's ORM, and a component
        # can only be a Job where its module is loaded, so it is looked up, never imported, here.
        jobs = sys.modules.get("airflow.jobs.job")
        if jobs is not None and isinstance(component, jobs.Job):
            gc.freeze()


class TrafficWatchPlugin(AirflowPlugin):
    name = "trafficwatch"
    listeners: ClassVar[list[object]] = [FreezeAtJobStart()]
