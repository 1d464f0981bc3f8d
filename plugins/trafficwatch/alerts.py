"""The freshness alert: are the dashboards older than `TRAFFICWATCH_STALE_AFTER` while the source still publishes?

- `assess` decides from plain inputs (what the serving file shows, the newest landed snapshot, the clock):
  *fresh*, *stale* (the alert), *source down* (nothing landed recently: upstream or ingest, which
  `traffic_ingest` shows) or *no data* (nothing landed yet). Its one line names what is stale and by how much.
- `check_freshness` gathers those inputs as `trafficwatch lag` reads them (the serving file's newest
  `segment_latest.measured_at`, the newest showable snapshot under raw/ and whether the merge log holds it):
  the function of both `trafficwatch check-freshness` and the `pipeline_freshness` DAG.
- `notifier_from_env` builds the Airflow notifier (`BaseNotifier`) that `TRAFFICWATCH_ALERT_NOTIFIER` names,
  called when the check fails, once per red streak.

"The source is up" means: the newest snapshot landed in raw/ (the newest upstream time the merge did not
refuse) landed within `TRAFFICWATCH_STALE_AFTER` of now. The upstream publishes about every 3 minutes and
the ingest lands each new snapshot within a minute, so a quiet raw/ means the upstream or the ingest
stopped, not the merge, the build or the publish.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from trafficwatch.config import ConfigError, Settings, load_settings

log = logging.getLogger(__name__)

STALE_AFTER_S = 600.0

FRESH, STALE, SOURCE_DOWN, NO_DATA = "fresh", "stale", "source_down", "no_data"


def stale_after_s() -> float:
    """`TRAFFICWATCH_STALE_AFTER`: seconds (default 600) the newest data shown may be old."""
    return load_settings().stale_after_s


@dataclass(frozen=True)
class Landed:
    """The newest showable snapshot under raw/: its key, upstream time, landing time, and whether it is merged."""

    key: str
    measured_at: datetime
    landed_at: datetime
    merged: bool


@dataclass(frozen=True)
class Freshness:
    state: str  # fresh | stale | source_down | no_data
    line: str  # one line for people: what is (or is not) stale, and by how much
    checked_at: datetime
    stale_after_s: float
    serving_measured_at: datetime | None
    serving_age_s: float | None
    newest_landed: Landed | None

    @property
    def stale(self) -> bool:
        return self.state == STALE

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {key: value.isoformat() if isinstance(value, datetime) else value for key, value in data.items()} | {
            "newest_landed": {
                key: value.isoformat() if isinstance(value, datetime) else value
                for key, value in asdict(self.newest_landed).items()
            }
            if self.newest_landed
            else None
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Freshness:
        """The inverse of `as_dict` (the worker's answer: JSON carries the datetimes as ISO text)."""

        def when(text: str | None) -> datetime | None:
            return datetime.fromisoformat(text) if text else None

        landed = data["newest_landed"]
        newest = (
            Landed(landed["key"], when(landed["measured_at"]), when(landed["landed_at"]), landed["merged"])
            if landed
            else None
        )
        return cls(
            data["state"], data["line"], when(data["checked_at"]), data["stale_after_s"],
            when(data["serving_measured_at"]), data["serving_age_s"], newest,
        )  # fmt: skip


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _threshold(seconds: float) -> str:
    return f"threshold {seconds / 60:g} min"


def assess(
    serving_measured_at: datetime | None,
    newest: Landed | None,
    now: datetime,
    stale_after: float = STALE_AFTER_S,
    first_landed_at: datetime | None = None,
    serving_db: Path | str | None = None,
) -> Freshness:
    """The decision, from hand-made or gathered inputs.

    `serving_measured_at`: the newest measurement the dashboards show (None: no serving file, or an empty one).
    `newest`: the newest showable landed snapshot (None: nothing landed). `first_landed_at`: when the first
    snapshot landed (only used without data shown: how long the dashboards have been empty while data came).
    """

    def result(state: str, line: str) -> Freshness:
        age = round((now - serving_measured_at).total_seconds(), 1) if serving_measured_at else None
        return Freshness(state, line, now, stale_after, serving_measured_at, age, newest)

    threshold = _threshold(stale_after)
    if newest is None:
        landed = "nothing landed in raw/ yet"
    else:
        ago = _minutes((now - newest.landed_at).total_seconds())
        landed = (
            f"newest landed {newest.measured_at.astimezone(UTC).isoformat()} (landed {ago} ago), "
            f"merged: {'yes' if newest.merged else 'no'}"
        )
    source_up = newest is not None and (now - newest.landed_at).total_seconds() <= stale_after

    if serving_measured_at is not None:
        age = (now - serving_measured_at).total_seconds()
        shown = f"newest data shown {serving_measured_at.astimezone(UTC).isoformat()} is {_minutes(age)} old"
        if age <= stale_after:
            return result(FRESH, f"dashboards fresh: {shown} ({threshold})")
        if source_up:
            return result(STALE, f"dashboards stale: {shown} ({threshold}); {landed}")
        return result(
            SOURCE_DOWN,
            f"source quiet, no alert: {shown} ({threshold}), but no snapshot landed within the threshold "
            f"(upstream or traffic_ingest down); {landed}",
        )

    where = f" ({serving_db})" if serving_db else ""
    if newest is None:
        return result(NO_DATA, f"nothing to show yet: no data in the serving file{where} and {landed}")
    if not source_up:
        return result(
            SOURCE_DOWN,
            f"source quiet, no alert: no data in the serving file{where}, and no snapshot landed within the "
            f"threshold (upstream or traffic_ingest down); {landed}",
        )
    waited = (now - (first_landed_at or newest.landed_at)).total_seconds()
    if waited > stale_after:
        return result(
            STALE,
            f"dashboards stale: no data shown (serving file{where} absent or empty) although snapshots have "
            f"landed for {_minutes(waited)} ({threshold}); {landed}",
        )
    return result(
        FRESH,
        f"dashboards not published yet: the first snapshot landed {_minutes(waited)} ago ({threshold}); {landed}",
    )


def check_freshness(settings: Settings) -> Freshness:
    """Assess what the dashboards show now (the inputs of `trafficwatch lag`, read the same way).

    Only raw/ keys from the day before the newest data shown on are listed (keys sort by upstream time): a
    check every minute does not list a month of snapshots. Without data shown, the whole of raw/ is listed.
    """
    from trafficwatch import lake, operate, raw, serving, storage

    s3 = storage.s3_client(settings)
    serving_db = serving.serving_db_path(settings)
    served, _ = operate.served_latest(serving_db)
    start_after = f"{raw.RAW_PREFIX}date={(served - timedelta(days=1)).date().isoformat()}" if served else ""
    landed = {obj.key: obj.landed_at for obj in raw.list_raw(s3, settings.bucket, start_after=start_after)}
    merged, refused = operate.merge_log_keys(settings, lake.storage_options(settings))
    showable = operate.showable_snapshots(landed, refused)
    newest_key = max(showable, default=None)  # keys sort by upstream time
    newest = Landed(newest_key, showable[newest_key], landed[newest_key], newest_key in merged) if newest_key else None
    first_landed_at = min((landed[key] for key in showable), default=None)
    return assess(served, newest, datetime.now(UTC), settings.stale_after_s, first_landed_at, serving_db)


# --------------------------------------------------------------------------- notifiers


def notifier_from_env() -> Any:
    """The notifier `TRAFFICWATCH_ALERT_NOTIFIER` names, as an Airflow `BaseNotifier` for a task's
    `on_failure_callback`, or None when it is unset (then a failed check task is the only signal).

    `smtp`: the SMTP provider's `SmtpNotifier`, through the Airflow connection `TRAFFICWATCH_ALERT_SMTP_CONN_ID`
    (default `trafficwatch_smtp`: `AIRFLOW_CONN_TRAFFICWATCH_SMTP` or the UI), to `TRAFFICWATCH_ALERT_EMAIL_TO`
    (comma-separated), from `TRAFFICWATCH_ALERT_EMAIL_FROM` (else the connection's `from_email` extra). The
    subject is the failure's one line. It sends when the check turns red, not again while it stays red.
    """
    settings = load_settings()
    if not settings.alert_notifier:
        return None
    to = list(settings.alert_email_to)
    if not to:
        raise ConfigError("TRAFFICWATCH_ALERT_NOTIFIER=smtp needs TRAFFICWATCH_ALERT_EMAIL_TO (comma-separated)")
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    smtp = SmtpNotifier(
        to=to,
        from_email=settings.alert_email_from,
        smtp_conn_id=settings.alert_smtp_conn_id,
        subject="[TrafficWatch] {{ exception }}",
        html_content=(
            "<p>{{ exception | e }}</p>"
            "<p>DAG {{ dag.dag_id }}, task {{ ti.task_id }}, run {{ run_id }}, try {{ ti.try_number }}.</p>"
            "<p>The check stays failed, without another message, until the dashboards are fresh again.</p>"
        ),
    )
    return _once_per_red_streak(smtp)


def _once_per_red_streak(inner: Any) -> Any:
    """`inner`, called only when the previous run of the same task did not fail: one message per incident,
    not one per check while it lasts."""
    from airflow.sdk import BaseNotifier

    class OncePerRedStreak(BaseNotifier):
        template_fields = ()

        def __init__(self, notifier: Any) -> None:
            super().__init__()
            self.notifier = notifier

        def notify(self, context: Any) -> None:
            ti = context["ti"]
            try:
                previous = ti.get_previous_ti()
            except Exception as error:  # unknown: rather one message too many than none
                log.warning("previous run of %s unknown (%s): notifying", ti.task_id, error)
                previous = None
            if previous is not None and previous.state == "failed":
                log.info("previous check failed too: already notified, no message")
                return
            self.notifier(context)

    return OncePerRedStreak(inner)
