"""Waiting for new raw snapshots without holding a worker slot: a trigger and its deferrable sensor.

The sensor defers at once to `PendingRawTrigger`, which runs in Airflow's triggerer and polls S3 for
landed objects that the merge log does not hold yet, whoever landed them (the ingest DAG, a backfill
upload, another producer). When it finds some, the sensor resumes and the merge task runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator
from airflow.triggers.base import BaseTrigger, TriggerEvent


def count_pending() -> int:
    from trafficwatch import lake, storage
    from trafficwatch.config import load_settings

    settings = load_settings()
    s3 = storage.s3_client(settings)
    return len(lake.pending_raw(settings, s3, lake.ensure_tables(settings)))


class PendingRawTrigger(BaseTrigger):
    def __init__(self, poll_interval_s: float = 10.0) -> None:
        super().__init__()
        self.poll_interval_s = poll_interval_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("trafficwatch.waiting.PendingRawTrigger", {"poll_interval_s": self.poll_interval_s})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            pending = await asyncio.to_thread(count_pending)
            if pending:
                self.log.info("%d landed snapshots are waiting to be merged", pending)
                yield TriggerEvent({"pending": pending})
                return
            await asyncio.sleep(self.poll_interval_s)


class PendingRawSensor(BaseSensorOperator):
    """Succeeds when landed snapshots wait to be merged; waits for them in the triggerer."""

    def __init__(self, *, poll_interval_s: float = 10.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.poll_interval_s = poll_interval_s

    def execute(self, context: Any) -> int:
        pending = count_pending()
        if pending:
            self.log.info("%d landed snapshots are waiting to be merged", pending)
            return pending
        self.defer(
            trigger=PendingRawTrigger(self.poll_interval_s),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout),
        )
        return 0

    def execute_complete(self, context: Any, event: dict[str, Any]) -> int:
        return int(event["pending"])
