"""Every command fails in one line naming the cause, with exit code 1 and the traceback in the log file.

The real `trafficwatch` console script, run as a subprocess against a closed port, the real local S3 server
with wrong, missing or unauthorised keys, a missing bucket, a corrupt Delta log, dbt failing on S3, a serving
file that is not a DuckDB database, a snapshot file that is not JSON, and the worker failing a merge it was
handed. A raw key that is not a snapshot time no longer fails any command.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest

from tests.conftest import land_raw
from trafficwatch import lake, services, worker
from trafficwatch.config import Settings

pytestmark = pytest.mark.integration

TRAFFICWATCH = str(Path(sys.executable).parent / "trafficwatch")
TRAFFICWATCH_DEV = (sys.executable, "-m", "trafficwatch_dev.cli")  # the `trafficwatch-dev` console script's code
BACKFILL = ("backfill", "--start", "2024-08-26", "--end", "2024-08-27")
LAKE_COMMANDS = [("merge",), ("status",), ("lag",), ("maintain",), BACKFILL]
NOT_A_TIME = "raw/date=2024-08-26/notatime.json.gz"
# S3's answer to a HEAD request has no body, so no code saying whether the keys or the permission are wrong.
HEAD_FORBIDDEN = "S3 answered 403 Forbidden for bucket {bucket}: wrong keys, or the keys lack permission"


def run(*args: str, program: tuple[str, ...] = (TRAFFICWATCH,), **env: str | None) -> subprocess.CompletedProcess[str]:
    """`trafficwatch ARGS` (or `program` ARGS) with the test's environment, changed by `env` (None: unset)."""
    environ = os.environ.copy()
    for name, value in env.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    return subprocess.run([*program, *args], capture_output=True, text=True, timeout=240, env=environ)


def one_line_failure(done: subprocess.CompletedProcess[str], settings: Settings) -> str:
    """The single stderr line of a failed command, after checking the exit code and the log file."""
    assert done.returncode == 1, f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"not one line on stderr:\n{done.stderr}"
    log = (settings.home / "logs" / "trafficwatch.log").read_text()
    assert lines[0] in log, "the line is not in the log file"
    assert "Traceback (most recent call last)" in log[log.rindex(lines[0]) :], "no traceback after it in the log"
    return lines[0]


def s3(settings: Settings):
    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.aws_region)


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _command_ids(command: tuple[str, ...]) -> str:
    return command[0]


@pytest.mark.parametrize("command", [*LAKE_COMMANDS, ("ingest",)], ids=_command_ids)
def test_unreachable_endpoint(command, s3_settings, closed_port, request) -> None:
    if command == ("ingest",):
        request.getfixturevalue("feed")  # the snapshot is fetched; landing it fails
    endpoint = f"http://127.0.0.1:{closed_port}"
    line = one_line_failure(run(*command, AWS_ENDPOINT_URL=endpoint), s3_settings)
    assert line == f"{command[0]} failed: S3 endpoint {endpoint} unreachable (connection refused)"


@pytest.mark.parametrize("command", [*LAKE_COMMANDS, ("ingest",)], ids=_command_ids)
def test_wrong_keys(command, s3_settings, request) -> None:
    if command == ("ingest",):
        request.getfixturevalue("feed")
    done = run(*command, AWS_ACCESS_KEY_ID="wrong" + uuid.uuid4().hex[:8], AWS_SECRET_ACCESS_KEY="wrong")
    line = one_line_failure(done, s3_settings)
    bucket = s3_settings.bucket
    if command == ("ingest",):  # its first request is a HEAD
        assert line == f"ingest failed: {HEAD_FORBIDDEN.format(bucket=bucket)}"
    else:
        assert line == (
            f"{command[0]} failed: S3 refused the credentials (InvalidAccessKeyId) for bucket {bucket}: "
            "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )


@pytest.mark.parametrize("fault", ["unreachable", "wrong keys"])
def test_build(fault, s3_settings, closed_port) -> None:
    """dbt's own S3 client fails inside the build: the line names the cause, dbt's error is in the log."""
    env = {"TRAFFICWATCH_SERVING_DB": str(s3_settings.home / "serving" / "traffic.duckdb")}
    if fault == "unreachable":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{closed_port}"
        cause = f"S3 endpoint http://127.0.0.1:{closed_port} unreachable ("
    else:
        env["AWS_ACCESS_KEY_ID"] = "wrong" + uuid.uuid4().hex[:8]
        cause = f"S3 answered 403 Forbidden for bucket {s3_settings.bucket}: wrong keys"
    done = run("build", **env)
    line = one_line_failure(done, s3_settings)
    assert line.startswith(f"build failed: {cause}")
    assert line.endswith("(dbt build; serving file not published)")
    assert done.stdout == ""  # dbt prints nothing: its console logger is off
    # dbt's error, as dbt fired it, forwarded to the log file (trafficwatch.dbt_build._forward_warnings).
    log = (s3_settings.home / "logs" / "trafficwatch.log").read_text()
    assert "WARNING trafficwatch.dbt_build: dbt: Encountered an error: Runtime Error" in log


@pytest.mark.parametrize("command", [("status",), ("merge",)], ids=_command_ids)
def test_wrong_secret(command, s3_settings) -> None:
    line = one_line_failure(run(*command, AWS_SECRET_ACCESS_KEY="not-the-secret"), s3_settings)
    assert line.startswith(f"{command[0]} failed: S3 refused the credentials (SignatureDoesNotMatch) for bucket ")


@pytest.mark.parametrize("command", [("status",), ("merge",), ("lag",)], ids=_command_ids)
def test_no_credentials_and_no_region(command, s3_settings) -> None:
    """Without keys and region: one line, none of delta-rs' AWS SDK warnings about EC2's metadata service."""
    done = run(*command, AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None, AWS_REGION=None, AWS_DEFAULT_REGION=None)
    line = one_line_failure(done, s3_settings)
    assert line == f"{command[0]} failed: no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"


# Not ingest: SeaweedFS creates a missing bucket on upload for an admin identity (AWS S3 would refuse).
@pytest.mark.parametrize("command", LAKE_COMMANDS, ids=_command_ids)
def test_missing_bucket(command, s3_settings) -> None:
    missing = f"missing-{uuid.uuid4().hex[:10]}"
    line = one_line_failure(run(*command, TRAFFICWATCH_BUCKET=missing), s3_settings)
    assert line == (
        f"{command[0]} failed: S3 bucket {missing} does not exist at {s3_settings.s3_endpoint_url}: "
        "create it or set TRAFFICWATCH_BUCKET"
    )


@pytest.mark.parametrize("command", [*LAKE_COMMANDS, ("ingest",)], ids=_command_ids)
def test_access_denied(command, s3_settings, request) -> None:
    """A bucket policy denies everything: the keys are good, the permission is missing."""
    if command == ("ingest",):
        request.getfixturevalue("feed")
    bucket = s3_settings.bucket
    deny = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:*",
                "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
            }
        ],
    }
    s3(s3_settings).put_bucket_policy(Bucket=bucket, Policy=json.dumps(deny))
    line = one_line_failure(run(*command), s3_settings)
    if command == ("ingest",):  # its first request is a HEAD
        assert line == f"ingest failed: {HEAD_FORBIDDEN.format(bucket=bucket)}"
    else:
        assert line == (
            f"{command[0]} failed: S3 denied access (AccessDenied) to bucket {bucket}: "
            "the keys lack permission (IAM or bucket policy)"
        )


@pytest.mark.parametrize("command", LAKE_COMMANDS, ids=_command_ids)
def test_corrupt_delta_log(command, s3_settings, sample_bytes) -> None:
    lake.ensure_tables(s3_settings)
    land_raw(s3_settings, sample_bytes)  # something to merge or backfill: every command opens the merge log
    key = f"{lake.LAKE_PREFIX}{lake.MERGE_LOG}/_delta_log/00000000000000000000.json"
    s3(s3_settings).put_object(Bucket=s3_settings.bucket, Key=key, Body=b"this is no Delta log {{{\n")
    line = one_line_failure(run(*command), s3_settings)
    table = lake.table_uri(s3_settings, lake.MERGE_LOG)
    assert line.startswith(f"{command[0]} failed: Delta table {table}: transaction log unreadable (Json error: ")


@pytest.mark.parametrize("command", [BACKFILL, ("lag",), ("merge",)], ids=_command_ids)
def test_a_raw_key_that_is_not_a_time_stops_no_command(command, s3_settings) -> None:
    """It used to crash backfill (and lag) with a traceback: now the merge quarantines it and the rest go on."""
    s3(s3_settings).put_object(Bucket=s3_settings.bucket, Key=NOT_A_TIME, Body=b"whatever")
    done = run(*command)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_a_snapshot_file_that_is_not_json(s3_settings, tmp_path) -> None:
    """A parse failure: the feed's snapshot file."""
    snapshot = tmp_path / "snapshot.json"
    snapshot.write_text('[{"datetime": "2024-08-26T12:43:00+02:00",')  # cut short
    with pytest.raises(json.JSONDecodeError) as parse:
        json.loads(snapshot.read_text())
    line = one_line_failure(run("feed", "--port", "0", str(snapshot), program=TRAFFICWATCH_DEV), s3_settings)
    assert line == f"feed failed: {snapshot}: invalid JSON: {parse.value}"


def test_serving_file_that_is_not_duckdb(s3_settings, tmp_path) -> None:
    serving_db = tmp_path / "serving.duckdb"
    serving_db.write_bytes(b"not a database, but a file of text that is long enough to be read as a header\n" * 100)
    line = one_line_failure(run("lag", TRAFFICWATCH_SERVING_DB=str(serving_db)), s3_settings)
    assert line.startswith("lag failed: DuckDB IOException: ")
    assert str(serving_db) in line


def test_a_bucket_name_s3_would_refuse(s3_settings) -> None:
    line = one_line_failure(run(*BACKFILL, TRAFFICWATCH_BUCKET="Not/A/Bucket"), s3_settings)
    assert line.startswith(
        'backfill failed: S3 request not sent: Parameter validation failed: Invalid bucket name "Not/A/Bucket"'
    )


def test_an_unexpected_error_keeps_its_type_and_says_where_its_traceback_is(s3_settings, monkeypatch, capsys) -> None:
    """An error of no known kind: its type and message, and where the traceback is (in-process, to raise one)."""
    from trafficwatch import cli

    def broken(settings, s3=None):
        raise TypeError("'NoneType' object is not subscriptable\nsecond line")

    monkeypatch.setattr(lake, "maintain", broken)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # what main sets, undone after the test
    assert cli.main(["maintain"]) == 1
    log_file = s3_settings.home / "logs" / "trafficwatch.log"
    assert capsys.readouterr().err == (
        f"maintain failed: TypeError: 'NoneType' object is not subscriptable second line (traceback in {log_file})\n"
    )
    assert "raise TypeError(\"'NoneType' object is not subscriptable" in log_file.read_text()


@pytest.fixture
def running_worker(s3_settings):
    service = services.worker(worker.socket_path(s3_settings))
    services.start(service, s3_settings.home)
    yield s3_settings
    services.stop(s3_settings.home, service.name)


def test_a_merge_the_worker_fails_comes_back_as_one_line(running_worker) -> None:
    settings = running_worker
    assert run("merge").returncode == 0  # the worker merges (nothing), its tables open
    key = f"{lake.LAKE_PREFIX}{lake.MERGE_LOG}/_delta_log/00000000000000000001.json"
    s3(settings).put_object(Bucket=settings.bucket, Key=key, Body=b"garbage, not a commit\n")

    line = one_line_failure(run("merge"), settings)
    table = lake.table_uri(settings, lake.MERGE_LOG)
    assert line.startswith(f"merge failed: Delta table {table}: transaction log unreadable (Json error: ")
    assert line.endswith("(in the worker; traceback in its log)")
    assert "Traceback (most recent call last)" in (settings.home / "logs" / "worker.log").read_text()

    s3(settings).delete_object(Bucket=settings.bucket, Key=key)
    assert run("merge").returncode == 0  # the worker outlived the failed request
