"""Exactly-once writes of rows to the lake's tables, and the retry of a commit that raced another.

Every write only inserts what is missing: rows whose time range no file of the table covers (the Delta log's
statistics say so) are appended; otherwise a MERGE on the natural key inserts the missing ones. Every commit
of a merge carries the app transaction APP_ID with the merge's `transaction` number, so two merges racing
conflict (CommitFailedError) instead of both appending; the loser retries on the fresh table state, where
its rows are no longer new.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import polars as pl
from deltalake import CommitProperties, DeltaTable, PostCommitHookProperties, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError

from trafficwatch.lake.schema import APP_ID, OBSERVATIONS, REJECTED, SCHEMAS, UTC_US

log = logging.getLogger(__name__)

COMMIT_ATTEMPTS = 5
# After every commit delta-rs would list the whole _delta_log to delete expired entries (1,600 files with a
# 24 h log retention: a cost that grows with the log). Merges leave that to lake_maintenance (hourly);
# they still write a checkpoint every delta.checkpointInterval commits.
MERGE_HOOKS = PostCommitHookProperties(create_checkpoint=True, cleanup_expired_logs=False)


def commit_with_retries(table: DeltaTable, action: Callable[[], Any], what: str) -> Any:
    """Run a Delta write, retrying on a conflicting concurrent commit with fresh table state.

    Every write of a merge carries the app transaction APP_ID: delta-rs refuses a commit when a commit
    with the same app id landed since the version it read, so two merges racing cannot both append.
    """
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            return action()
        except CommitFailedError as exc:
            if attempt == COMMIT_ATTEMPTS:
                raise
            log.warning("%s: concurrent commit (%s); retrying on fresh state (%d)", what, exc, attempt)
            time.sleep(0.2 * attempt)
            table.update_incremental()
    return None


def time_bounds(frame: pl.DataFrame) -> str:
    """Literal time bounds of the rows: delta-rs does not prune the target from join predicates alone,
    but skips every file whose `measured_at` statistics fall outside literals. None when some row has no
    time (a merge log row of a key that names none): such rows are matched on their key alone."""
    if frame["measured_at"].null_count():
        return "true"
    low, high = (_utc_literal(frame["measured_at"].min()), _utc_literal(frame["measured_at"].max()))
    return f"t.measured_at >= '{low}' AND t.measured_at <= '{high}'"


def _utc_literal(moment: datetime) -> str:
    """An instant as SQL text to the second; the year zero-padded (`%Y` writes year 1 as "1")."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


def _bounds_predicate(frame: pl.DataFrame) -> str:
    dates = ", ".join(f"'{day}'" for day in frame["measured_date"].unique().sort().to_list())
    return f"t.measured_date IN ({dates}) AND {time_bounds(frame)}"


def may_hold(table: DeltaTable, frame: pl.DataFrame) -> bool:
    """Whether any file of the table may hold rows measured within the frame's time range.

    Decided from the `measured_at` statistics of the Delta log alone. When no file may, the rows are
    new for certain and are appended; otherwise a MERGE inserts only the missing ones (a replay after
    a crash, or a backfill into the past). Files without statistics count as "may".
    """
    actions = pl.DataFrame(table.get_add_actions(flatten=True))
    if actions.is_empty():
        return False
    if "min.measured_at" not in actions.columns or "max.measured_at" not in actions.columns:
        return True
    low, high = frame["measured_at"].min(), frame["measured_at"].max()
    lowest, highest = pl.col("min.measured_at"), pl.col("max.measured_at")
    overlap = lowest.is_null() | highest.is_null() | ((lowest <= high) & (highest >= low))
    return bool(actions.select(overlap.any()).item())


def insert_missing(table: DeltaTable, rows: pl.DataFrame, key_predicate: str, transaction: int) -> None:
    """Append the rows if the table cannot hold any of them yet, else MERGE inserting the missing ones."""
    commit = CommitProperties(app_transactions=[Transaction(APP_ID, transaction)])
    source = rows.to_arrow()
    if not may_hold(table, rows):
        write_deltalake(table, source, mode="append", commit_properties=commit, post_commithook_properties=MERGE_HOOKS)
        return
    table.merge(
        source,
        predicate=key_predicate,
        source_alias="s",
        target_alias="t",
        commit_properties=commit,
        post_commithook_properties=MERGE_HOOKS,
    ).when_not_matched_insert_all().execute()


def merge_observations(table: DeltaTable, rows: pl.DataFrame, transaction: int) -> int:
    """Insert the observations that are not there yet; returns the table version after the write."""
    rows = rows.select(list(SCHEMAS[OBSERVATIONS]))
    predicate = "t.segment_key = s.segment_key AND t.measured_at = s.measured_at AND " + _bounds_predicate(rows)
    commit_with_retries(table, lambda: insert_missing(table, rows, predicate, transaction), OBSERVATIONS)
    return table.version()


def merge_rejected(table: DeltaTable | None, rejected: pl.DataFrame, transaction: int) -> None:
    if rejected.is_empty() or table is None:
        return
    now = datetime.now(UTC)
    record_columns = [c for c in rejected.columns if c not in ("reason", "source_key", "landed_at")]
    rows = rejected.with_columns(
        pl.struct(record_columns).struct.json_encode().alias("record_json"),
        pl.lit(now, dtype=UTC_US).alias("rejected_at"),
        pl.col("segment_key").cast(pl.String),
    ).select(list(SCHEMAS[REJECTED]))
    predicate = "t.source_key = s.source_key AND t.record_index = s.record_index AND " + time_bounds(rows)
    commit_with_retries(table, lambda: insert_missing(table, rows, predicate, transaction), REJECTED)
