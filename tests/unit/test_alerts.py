"""The freshness decision on hand-made inputs, and the notifier the configuration names."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from trafficwatch import alerts
from trafficwatch.alerts import Landed, assess
from trafficwatch.config import ConfigError

NOW = datetime(2026, 11, 30, 10, 30, tzinfo=UTC)


def _landed(measured_min_ago: float, landed_min_ago: float, merged: bool = False) -> Landed:
    return Landed(
        key="raw/date=2026-11-30/x.json.gz",
        measured_at=NOW - timedelta(minutes=measured_min_ago),
        landed_at=NOW - timedelta(minutes=landed_min_ago),
        merged=merged,
    )


def test_fresh_when_the_data_shown_is_younger_than_the_threshold() -> None:
    result = assess(NOW - timedelta(minutes=4), _landed(3, 1, merged=True), NOW)
    assert (result.state, result.stale, result.serving_age_s) == ("fresh", False, 240.0)
    assert result.line == (
        "dashboards fresh: newest data shown 2026-11-30T10:26:00+00:00 is 4.0 min old (threshold 10 min)"
    )


def test_exactly_at_the_threshold_is_still_fresh() -> None:
    assert assess(NOW - timedelta(minutes=10), _landed(1, 0.5), NOW).state == "fresh"


def test_stale_while_the_source_is_up_names_what_and_by_how_much() -> None:
    shown = NOW - timedelta(minutes=14, seconds=12)
    result = assess(shown, _landed(2, 0.5, merged=False), NOW)
    assert result.stale
    assert result.line == (
        "dashboards stale: newest data shown 2026-11-30T10:15:48+00:00 is 14.2 min old (threshold 10 min); "
        "newest landed 2026-11-30T10:28:00+00:00 (landed 0.5 min ago), merged: no"
    )
    merged = assess(shown, _landed(2, 0.5, merged=True), NOW)
    assert merged.stale and merged.line.endswith("merged: yes")  # then the build or the publish is stuck


def test_a_threshold_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAFFICWATCH_STALE_AFTER", "300")
    assert alerts.stale_after_s() == 300.0
    result = assess(NOW - timedelta(minutes=6), _landed(1, 1), NOW, alerts.stale_after_s())
    assert result.stale and "is 6.0 min old (threshold 5 min)" in result.line
    for bad in ("ten", "0", "-5"):
        monkeypatch.setenv("TRAFFICWATCH_STALE_AFTER", bad)
        with pytest.raises(ConfigError, match="TRAFFICWATCH_STALE_AFTER"):
            alerts.stale_after_s()
    monkeypatch.delenv("TRAFFICWATCH_STALE_AFTER")
    assert alerts.stale_after_s() == 600.0


def test_source_down_is_not_an_alert() -> None:
    """Nothing landed within the threshold: the upstream (or the ingest, which traffic_ingest shows) stopped,
    and the dashboards being as old as the source is expected."""
    result = assess(NOW - timedelta(minutes=40), _landed(40, 38, merged=True), NOW)
    assert result.state == "source_down" and not result.stale
    assert "no snapshot landed within the threshold" in result.line
    assert "newest landed 2026-11-29" not in result.line and "(landed 38.0 min ago), merged: yes" in result.line


def test_a_snapshot_landed_recently_but_dated_long_ago_counts_as_the_source_up() -> None:
    """An upstream whose snapshots carry old times: it still publishes, and the dashboards are stale."""
    result = assess(NOW - timedelta(minutes=30), _landed(25, 1, merged=True), NOW)
    assert result.stale


def test_no_serving_file_yet() -> None:
    nothing = assess(None, None, NOW, serving_db="/srv/serving.duckdb")
    assert nothing.state == "no_data" and not nothing.stale
    assert nothing.line == (
        "nothing to show yet: no data in the serving file (/srv/serving.duckdb) and nothing landed in raw/ yet"
    )

    starting = assess(None, _landed(3, 1), NOW, first_landed_at=NOW - timedelta(minutes=4))
    assert starting.state == "fresh" and "not published yet" in starting.line

    never_published = assess(None, _landed(3, 1), NOW, first_landed_at=NOW - timedelta(minutes=25))
    assert never_published.stale
    assert "no data shown" in never_published.line and "landed for 25.0 min (threshold 10 min)" in never_published.line

    quiet = assess(None, _landed(60, 60), NOW, first_landed_at=NOW - timedelta(minutes=90))
    assert quiet.state == "source_down"


def test_as_dict_is_json_ready() -> None:
    import json

    data = assess(NOW - timedelta(minutes=1), _landed(1, 1), NOW).as_dict()
    assert json.loads(json.dumps(data))["newest_landed"]["landed_at"] == "2026-11-30T10:29:00+00:00"


@pytest.mark.parametrize(
    "freshness",
    [
        assess(NOW - timedelta(minutes=14), _landed(1, 0.5, merged=True), NOW),  # stale
        assess(None, None, NOW, serving_db="/srv/serving.duckdb"),  # nothing shown, nothing landed
        assess(NOW - timedelta(minutes=1), None, NOW),  # shown, nothing landed
    ],
    ids=["stale", "no_data", "nothing_landed"],
)
def test_from_dict_gives_back_what_as_dict_gave(freshness: alerts.Freshness) -> None:
    """The worker answers with as_dict through JSON; the requester rebuilds the same Freshness."""
    import json

    again = alerts.Freshness.from_dict(json.loads(json.dumps(freshness.as_dict())))
    assert again == freshness
    assert again.checked_at.tzinfo is not None


def test_no_notifier_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRAFFICWATCH_ALERT_NOTIFIER", raising=False)
    assert alerts.notifier_from_env() is None
    monkeypatch.setenv("TRAFFICWATCH_ALERT_NOTIFIER", "none")
    assert alerts.notifier_from_env() is None


def test_a_misconfigured_notifier_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAFFICWATCH_ALERT_NOTIFIER", "pager")
    with pytest.raises(ConfigError, match="'pager' is not one of none, smtp"):
        alerts.notifier_from_env()
    monkeypatch.setenv("TRAFFICWATCH_ALERT_NOTIFIER", "smtp")
    monkeypatch.delenv("TRAFFICWATCH_ALERT_EMAIL_TO", raising=False)
    with pytest.raises(ConfigError, match="needs TRAFFICWATCH_ALERT_EMAIL_TO"):
        alerts.notifier_from_env()


def test_smtp_notifier_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier
    from airflow.sdk import BaseNotifier

    monkeypatch.setenv("TRAFFICWATCH_ALERT_NOTIFIER", "SMTP")
    monkeypatch.setenv("TRAFFICWATCH_ALERT_EMAIL_TO", "ops@example.org, oncall@example.org")
    monkeypatch.setenv("TRAFFICWATCH_ALERT_EMAIL_FROM", "trafficwatch@example.org")
    notifier = alerts.notifier_from_env()
    assert isinstance(notifier, BaseNotifier)
    smtp = notifier.notifier
    assert isinstance(smtp, SmtpNotifier)
    assert (smtp.to, smtp.from_email, smtp.smtp_conn_id) == (
        ["ops@example.org", "oncall@example.org"], "trafficwatch@example.org", "trafficwatch_smtp")  # fmt: skip
    monkeypatch.setenv("TRAFFICWATCH_ALERT_SMTP_CONN_ID", "mail_relay")
    assert alerts.notifier_from_env().notifier.smtp_conn_id == "mail_relay"
