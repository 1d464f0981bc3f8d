"""`pipeline_freshness` run for real with dag.test(): a stale serving file while a snapshot has just landed in the
real local S3 fails the check and sends one e-mail through the SMTP notifier, to a sink on loopback."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import Message
from pathlib import Path

import duckdb
import pytest
from airflow.dag_processing.dagbag import DagBag

from tests.conftest import REPO, SAMPLE_DATETIME, land_raw, redated

pytestmark = [pytest.mark.airflow, pytest.mark.integration]


class SmtpSink:
    """The smallest SMTP server smtplib can send to (no TLS, no auth): keeps each message it receives."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(asyncio.start_server(self._session, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def reply(line: str) -> None:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()

        await reply("220 sink ready")
        while line := await reader.readline():
            verb = line.decode(errors="replace").strip().split(" ")[0].upper()
            if verb == "EHLO":
                await reply("250-sink\r\n250 8BITMIME")
            elif verb == "DATA":
                await reply("354 end with <CRLF>.<CRLF>")
                body = b""
                while (data := await reader.readline()) not in (b".\r\n", b""):
                    body += data[1:] if data.startswith(b"..") else data
                self.messages.append(message_from_bytes(body))
                await reply("250 queued")
            elif verb == "QUIT":
                await reply("221 bye")
                break
            elif verb in ("HELO", "MAIL", "RCPT", "RSET", "NOOP"):
                await reply("250 ok")
            else:
                await reply("502 not implemented")
        writer.close()

    def close(self) -> None:
        self.server.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    sink = SmtpSink()
    try:
        yield sink
    finally:
        sink.close()


def _serve(serving_db: Path, measured_at: datetime) -> None:
    """A serving file whose newest data shown is `measured_at` (replaced, as a publish does)."""
    serving_db.unlink(missing_ok=True)
    with duckdb.connect(str(serving_db)) as con:
        con.execute("CREATE TABLE segment_latest AS SELECT ?::TIMESTAMPTZ AS measured_at", [measured_at])


def _text(message: Message) -> str:
    parts = message.walk() if message.is_multipart() else [message]
    return "".join(part.get_payload(decode=True).decode() for part in parts if part.get_content_type() == "text/html")


def _run(dag) -> tuple[str, str]:
    run = dag.test()
    (ti,) = run.get_task_instances()
    return run.state, ti.state


def test_stale_dashboards_fail_the_check_and_send_one_mail(
    airflow_db, s3_settings, sample_bytes, smtp_sink, tmp_path, monkeypatch
) -> None:
    serving_db = tmp_path / "serving.duckdb"
    monkeypatch.setenv("TRAFFICWATCH_SERVING_DB", str(serving_db))
    monkeypatch.setenv("TRAFFICWATCH_ALERT_NOTIFIER", "smtp")
    monkeypatch.setenv("TRAFFICWATCH_ALERT_EMAIL_TO", "ops@example.org")
    monkeypatch.setenv("TRAFFICWATCH_ALERT_EMAIL_FROM", "trafficwatch@example.org")
    connection = {"conn_type": "smtp", "host": "127.0.0.1", "port": smtp_sink.port,
                  "extra": {"disable_ssl": True, "disable_tls": True, "timeout": 10, "retry_limit": 0}}  # fmt: skip
    monkeypatch.setenv("AIRFLOW_CONN_TRAFFICWATCH_SMTP", json.dumps(connection))
    # The source is up: a snapshot dated 2 minutes ago landed just now.
    now = datetime.now(UTC)
    sample_at = datetime.fromisoformat(SAMPLE_DATETIME.decode())
    land_raw(s3_settings, redated(sample_bytes, int((now - sample_at).total_seconds() // 60) - 2))
    dag = DagBag(dag_folder=str(REPO / "dags" / "pipeline_freshness.py")).dags["pipeline_freshness"]

    _serve(serving_db, now - timedelta(minutes=1))
    assert _run(dag) == ("success", "success")
    assert smtp_sink.messages == []

    _serve(serving_db, now - timedelta(minutes=20))
    assert _run(dag) == ("failed", "failed")
    (mail,) = smtp_sink.messages
    assert mail["To"] == "ops@example.org" and mail["From"] == "trafficwatch@example.org"
    subject = " ".join(str(mail["Subject"]).split())  # folded header
    assert subject.startswith("[TrafficWatch] dashboards stale: newest data shown ")
    assert " min old (threshold 10 min); newest landed " in subject and subject.endswith("merged: no")
    assert "dashboards stale" in _text(mail) and "pipeline_freshness" in _text(mail)

    assert _run(dag) == ("failed", "failed")  # still stale: still red, no second message
    assert len(smtp_sink.messages) == 1

    _serve(serving_db, datetime.now(UTC))
    assert _run(dag) == ("success", "success")
    assert len(smtp_sink.messages) == 1


def test_no_notifier_configured_only_fails_the_task(airflow_db, s3_settings, sample_bytes, tmp_path, monkeypatch):
    serving_db = tmp_path / "serving.duckdb"
    monkeypatch.setenv("TRAFFICWATCH_SERVING_DB", str(serving_db))
    monkeypatch.delenv("TRAFFICWATCH_ALERT_NOTIFIER", raising=False)
    now = datetime.now(UTC)
    sample_at = datetime.fromisoformat(SAMPLE_DATETIME.decode())
    land_raw(s3_settings, redated(sample_bytes, int((now - sample_at).total_seconds() // 60) - 2))
    _serve(serving_db, now - timedelta(minutes=30))
    dag = DagBag(dag_folder=str(REPO / "dags" / "pipeline_freshness.py")).dags["pipeline_freshness"]
    task = dag.get_task("check_dashboards_freshness")
    assert not task.on_failure_callback
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match=r"^dashboards stale: .* is 30\.\d min old \(threshold 10 min\)"):
        task.python_callable()
