"""Waiting for new raw snapshots without holding a worker slot: a trigger and its deferrable sensor.

The sensor defers at once to `PendingRawTrigger`, which runs in Airflow's triggerer and polls S3 for
landed objects that the merge log does not hold yet, whoever landed them (the ingest DAG, a backfill
upload, another producer). When it finds some, the sensor resumes and the merge task runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.sdk import BaseSensorOperator
from airflow.sdk.exceptions import AirflowException, AirflowSkipException
from airflow.triggers.base import BaseTrigger, TriggerEvent

from trafficwatch.config import Settings


def lake_settings() -> Settings:
    """The task's settings (S3 from the Airflow connection when defined, see `connections`); a bad connection
    raises AirflowException with its one line."""
    from trafficwatch import errors
    from trafficwatch.connections import task_settings

    try:
        return task_settings()
    except Exception as error:
        raise AirflowException(errors.failure("wait for landed snapshots", error)) from None


def count_pending(settings: Settings | None = None) -> int:
    """Landed snapshots the merge log does not hold. A failure (S3 unreachable, wrong keys...) raises
    AirflowException with the one line `trafficwatch` would print; its traceback goes to the log."""
    from trafficwatch import errors, worker

    settings = settings or lake_settings()
    try:
        return worker.count_pending(settings)
    except Exception as error:
        raise AirflowException(errors.failure("wait for landed snapshots", error, settings)) from None


class PendingRawTrigger(BaseTrigger):
    """Fires with the number of pending snapshots, or with 0 once `wait_s` passed without any."""

    def __init__(self, poll_interval_s: float, wait_s: float) -> None:
        super().__init__()
        self.poll_interval_s = poll_interval_s
        self.wait_s = wait_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "trafficwatch.waiting.PendingRawTrigger",
            {"poll_interval_s": self.poll_interval_s, "wait_s": self.wait_s},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        # The trigger keeps its own deadline: dag.test() runs triggers inline and ignores defer timeouts.
        deadline = time.monotonic() + self.wait_s
        settings = None  # looked up once per wait: the connection is not read again at every poll
        while True:
            try:
                settings = settings or await asyncio.to_thread(lake_settings)
                pending = await asyncio.to_thread(count_pending, settings)
            except AirflowException as error:  # back to the task, as its one-line failure
                yield TriggerEvent({"pending": 0, "error": str(error)})
                return
            if pending or time.monotonic() >= deadline:
                yield TriggerEvent({"pending": pending})
                return
            await asyncio.sleep(self.poll_interval_s)


class PendingRawSensor(BaseSensorOperator):
    """Succeeds when landed snapshots wait to be merged; waits for them in the triggerer.

    After `timeout` seconds without any, it ends skipped (and so does the merge after it).
    """

    def __init__(self, *, poll_interval_s: float = 10.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.poll_interval_s = poll_interval_s

    def execute(self, context: Any) -> int:
        pending = count_pending()
        if pending:
            self.log.info("%d landed snapshots are waiting to be merged", pending)
            return pending
        self.defer(trigger=PendingRawTrigger(self.poll_interval_s, float(self.timeout)), method_name="execute_complete")
        return 0

    def execute_complete(self, context: Any, event: dict[str, Any]) -> int:
        if event.get("error"):
            raise AirflowException(event["error"])
        pending = int(event["pending"])
        if not pending:
            raise AirflowSkipException(f"no landed snapshot to merge after waiting {self.timeout:.0f} s")
        self.log.info("%d landed snapshots are waiting to be merged", pending)
        return pending
