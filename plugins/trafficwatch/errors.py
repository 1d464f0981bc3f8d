"""Failures as one line for people: the cause and what it concerns, for the CLI and the DAG tasks alike.

S3 (boto3, and the object store inside delta-rs, polars and DuckDB), credentials, Delta tables, DuckDB and
parse errors arrive as tracebacks of 30 to 100 lines, or as multi-line chains ("Generic S3 error ↳ ... ↳
Connection refused"). `describe` turns any of them into one line naming the cause, e.g.

    S3 endpoint http://127.0.0.1:1234 unreachable (connection refused)
    S3 refused the credentials (InvalidAccessKeyId) for bucket trafficwatch: check AWS_ACCESS_KEY_ID ...

and `failure` prefixes what failed and logs the traceback (to `$TRAFFICWATCH_HOME/logs/trafficwatch.log`
from the CLI, to the task log in Airflow). `trafficwatch` prints that line and exits 1; a DAG task raises
an Airflow exception whose message is that line. Nothing here imports the libraries it recognises: an
error can only be of a class whose module is already loaded.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path, PurePath
from types import TracebackType
from urllib.parse import urlsplit

from trafficwatch.config import ConfigError, Settings, load_settings

log = logging.getLogger(__name__)


# The marts build's failures (`dbt_build` raises them), here where nothing imports DuckDB or dbt: the worker's
# requesters raise them again as the same classes (`trafficwatch.worker`).
class BuildError(RuntimeError):
    """The marts could not be built or published; the message is one line for the operator."""


class DataTestsFailed(BuildError):
    """dbt data tests failed: the data is wrong, so nothing was published (retrying will not help)."""

    def __init__(self, message: str, tests: list[str]) -> None:
        super().__init__(message)
        self.tests = tests


MAX_LENGTH = 300  # of a message from elsewhere: an S3 error body, a Rust error with its debug dump
CREDENTIAL_CODES = (
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
    "InvalidClientTokenId", "AuthorizationHeaderMalformed",
)  # fmt: skip
DENIED_CODES = ("AccessDenied", "AllAccessDisabled", "AccountProblem")
MISSING_BUCKET_CODES = ("NoSuchBucket",)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
S3_CODE = re.compile(r"<Code>([A-Za-z0-9]+)</Code>")
S3_BUCKET = re.compile(r"<BucketName>([^<]+)</BucketName>")
S3_URL = re.compile(r"Error performing [A-Z]+ (https?://[^/\s]+)")
UNREACHABLE = (  # how an HTTP client says the server could not be reached, and what to call it
    (re.compile(r"connection refused|os error 111|errno 111", re.I), "connection refused"),
    (re.compile(r"dns error|failed to lookup address|name or service not known|failed to resolve|"
                r"nodename nor servname|temporary failure in name resolution", re.I), "host name not resolved"),
    (re.compile(r"timed out|\btime ?out\b", re.I), "timed out"),  # not delta-rs' "retry_timeout: 180s"
    (re.compile(r"error sending request|tcp connect error|could not connect|connection reset|"
                r"connection aborted|unable to connect", re.I), "connection failed"),
)  # fmt: skip
NO_CREDENTIALS = re.compile(
    r"169\.254\.169\.254|no credentials found|loading credentials|unable to locate credentials|"
    r"partial credentials",
    re.I,
)
OBJECT_STORE = re.compile(r"S3 error|object.store|Error performing [A-Z]+ https?://|<Code>", re.I)


def failure(
    action: str, error: BaseException, settings: Settings | None = None, traceback_in: Path | None = None
) -> str:
    """`<action> failed: <cause>`, one line; the traceback goes to the log (the file, the task log). For an
    error of no known kind, where its traceback is (`traceback_in`) ends the line."""
    cause = worker_cause(error) or recognised(error, settings or _settings())
    line = f"{action} failed: {cause or _unknown(error)}"
    if cause is None and traceback_in is not None:
        line += f" (traceback in {traceback_in})"
    log.error(line, exc_info=(type(error), error, error.__traceback__))
    return line


def describe(error: BaseException, settings: Settings | None = None) -> str:
    """The cause of `error` in one line: what went wrong and, when known, the endpoint, bucket, table or key."""
    return worker_cause(error) or recognised(error, settings or _settings()) or _unknown(error)


def worker_cause(error: BaseException) -> str | None:
    """The cause of an exception the worker failed with and this process raised again (see `worker`), as the
    worker described it: the frames that name its table or key, and its traceback, stayed over there."""
    cause = getattr(error, "worker_cause", None)
    return cause if isinstance(cause, str) else None


def recognised(error: BaseException, settings: Settings | None = None) -> str | None:
    """The cause of an error of a kind this module knows, or None (then only its type and message tell)."""
    text = ANSI.sub("", str(error))
    if isinstance(error, ConfigError):
        return f"configuration error: {text}"
    # Ours, already one line for people.
    if _is(error, "trafficwatch.landing", "IngestError") or _is(error, "trafficwatch.worker", "WorkerError"):
        return _first_line(text, limit=None)
    if isinstance(error, BuildError):  # dbt's message, which may hide an S3 failure
        s3 = _object_store(text, settings) if OBJECT_STORE.search(text) else None
        return f"{s3} (dbt build; serving file not published)" if s3 else _first_line(text, limit=None)
    if _is(error, "trafficwatch.payloads", "SourceError"):
        return _first_line(getattr(error, "reason", text), limit=None)
    boto = _botocore(error, settings)
    if boto:
        return boto
    if OBJECT_STORE.search(text) or NO_CREDENTIALS.search(text) or isinstance(error, ConnectionError):
        s3 = _object_store(text, settings)
        if s3:
            return s3
    delta = _delta(error, text)
    if delta:
        return delta
    if _is(error, "duckdb", "Error"):
        return f"DuckDB {type(error).__name__}: {_first_line(text)}"
    if isinstance(error, ValueError):  # parse errors: JSON, times, encodings; the object they concern first
        subject, message = _subject(error), _first_line(text)
        if isinstance(error, json.JSONDecodeError):
            message = f"invalid JSON: {message}"
        if subject is None:
            return None
        return message if subject in message else f"{subject}: {message}"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return None


# --------------------------------------------------------------------------- S3


def _botocore(error: BaseException, settings: Settings | None) -> str | None:
    exceptions = sys.modules.get("botocore.exceptions")
    if exceptions is None:
        return None
    if isinstance(error, exceptions.NoCredentialsError | exceptions.PartialCredentialsError):
        return _no_credentials(settings)
    if isinstance(error, exceptions.ParamValidationError):  # e.g. a bucket name S3 would refuse
        return f"S3 request not sent: {_joined(str(error))}"
    if isinstance(error, exceptions.EndpointConnectionError | exceptions.ConnectTimeoutError):
        url = str(error.kwargs.get("endpoint_url", ""))
        reason = _unreachable(str(error.kwargs.get("error", ""))) or _unreachable(str(error)) or "connection failed"
        return f"S3 endpoint {_endpoint(settings, url)} unreachable ({reason})"
    if isinstance(error, exceptions.ReadTimeoutError):
        return f"S3 endpoint {_endpoint(settings, str(error.kwargs.get('endpoint_url', '')))} unreachable (timed out)"
    if isinstance(error, exceptions.ClientError):
        details = error.response.get("Error", {})
        code = str(details.get("Code") or error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?"))
        bucket = details.get("BucketName") or (settings.bucket if settings else "?")
        operation = getattr(error, "operation_name", "")
        if code == "404" and operation == "HeadBucket":
            code = "NoSuchBucket"
        return _s3_code(code, bucket, settings, f"{operation}: {details.get('Message', '')}".strip(": "))
    return None


def _object_store(text: str, settings: Settings | None) -> str | None:
    """The cause in the message of delta-rs', polars' or DuckDB's S3 client, when it says one."""
    if NO_CREDENTIALS.search(text):
        return _no_credentials(settings)
    code = S3_CODE.search(text)
    if code:
        bucket = S3_BUCKET.search(text)
        return _s3_code(
            code.group(1), bucket.group(1) if bucket else (settings.bucket if settings else "?"), settings, ""
        )
    if "lacked the necessary privileges" in text:  # 403 without the body's code (cut short)
        return _s3_code("403", settings.bucket if settings else "?", settings, "")
    url = S3_URL.search(text)
    reason = _unreachable(text)
    if reason:
        return f"S3 endpoint {_endpoint(settings, url.group(1) if url else '')} unreachable ({reason})"
    status = re.search(r"\b(403 Forbidden|404 Not Found|5\d\d [A-Za-z ]+)", text)
    if status:
        return _s3_code(status.group(1).split()[0], settings.bucket if settings else "?", settings, status.group(1))
    retries = re.search(r"after (\d+) retries", text)  # no status, no code: the cause cut off (dbt's message)
    if url and retries:
        endpoint = _endpoint(settings, url.group(1))
        return f"S3 endpoint {endpoint} unreachable (no answer after {retries.group(1)} retries)"
    return None


def _s3_code(code: str, bucket: str, settings: Settings | None, message: str) -> str:
    if code in CREDENTIAL_CODES:
        return f"S3 refused the credentials ({code}) for bucket {bucket}: check {_keys(settings)}"
    if code in MISSING_BUCKET_CODES:
        return f"S3 bucket {bucket} does not exist at {_endpoint(settings, '')}: create it or set TRAFFICWATCH_BUCKET"
    if code == "403":  # a HEAD request: no body, so no code saying which
        return f"S3 answered 403 Forbidden for bucket {bucket}: wrong keys, or the keys lack permission"
    if code in DENIED_CODES:
        return f"S3 denied access ({code}) to bucket {bucket}: the keys lack permission (IAM or bucket policy)"
    if code in ("NoSuchKey", "404"):
        return f"S3 object not found in bucket {bucket} ({message or code})"
    return f"S3 error {code} for bucket {bucket}" + (f" ({_first_line(message)})" if message else "")


def _no_credentials(settings: Settings | None) -> str:
    return f"no S3 credentials found: set {_keys(settings)}"


def _keys(settings: Settings | None) -> str:
    """Where the S3 keys are set: the environment's variables, or the Airflow connection the settings came from."""
    if settings and settings.s3_source != "environment":
        return f"the login (access key id) and password (secret key) of {settings.s3_source}"
    return "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"


def _unreachable(text: str) -> str | None:
    return next((name for pattern, name in UNREACHABLE if pattern.search(text)), None)


def _endpoint(settings: Settings | None, url: str) -> str:
    """The S3 endpoint as configured (AWS_ENDPOINT_URL), else the scheme and host of the URL requested."""
    if settings and settings.s3_endpoint_url:
        return settings.s3_endpoint_url
    parts = urlsplit(url)
    if parts.scheme and parts.netloc:
        return f"{parts.scheme}://{parts.netloc}"
    return "AWS S3" if settings else "(unknown)"


# --------------------------------------------------------------------------- Delta


def _delta(error: BaseException, text: str) -> str | None:
    exceptions = sys.modules.get("deltalake.exceptions")
    if exceptions is None or not isinstance(error, exceptions.DeltaError):
        return None
    subject = _subject(error)
    table = f"Delta table {subject}" if subject else "a Delta table"
    # "Kernel error: Generic delta kernel error: <message>: <a Rust debug dump { ... }>"
    message = _first_line(re.sub(r"^(Kernel error:\s*)?(Generic delta kernel error:\s*)?", "", text).split(" { ")[0])
    if isinstance(error, exceptions.TableNotFoundError):
        return f"no Delta table at {subject}" if subject else f"Delta table not found: {message}"
    if isinstance(error, exceptions.CommitFailedError):
        return f"commit to {table} failed (another writer?): {message}"
    if isinstance(error, exceptions.SchemaMismatchError):
        return f"schema of {table} does not match: {message}"
    if isinstance(error, exceptions.DeltaProtocolError):
        return f"{table} is not readable by this delta-rs (protocol): {message}"
    if re.search(r"json|parse|invalid|unexpected|checkpoint", message, re.I):
        return f"{table}: transaction log unreadable ({message})"
    return f"{table}: {message}"


# --------------------------------------------------------------------------- helpers


def _subject(error: BaseException) -> str | None:
    """The table, object or file the failing code was working on, as the innermost frame of ours or delta-rs'
    that holds one says: a Delta table, a table `uri`, an object `key` or a file `path`. delta-rs, strptime
    and json do not say which table, raw key or file they failed on; the frames that called them do."""
    frames = []
    tb: TracebackType | None = error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        if frame.f_globals.get("__name__", "").startswith(("trafficwatch", "deltalake")):
            for name, value in frame.f_locals.items():
                subject = _named(name, value)
                if subject:
                    return subject
    return None


def _named(name: str, value: object) -> str | None:
    if type(value).__name__ == "DeltaTable":
        try:
            return str(value.table_uri).rstrip("/")  # type: ignore[attr-defined]
        except Exception:  # a table whose opening failed has no URI yet
            return None
    if name in ("uri", "table_uri") and isinstance(value, str) and "://" in value:
        return value.rstrip("/")
    if name == "key" and isinstance(value, str) and "/" in value:
        return value
    if name == "path" and isinstance(value, PurePath):
        return str(value)
    return None


def _is(error: BaseException, module: str, name: str) -> bool:
    loaded = sys.modules.get(module)
    cls = getattr(loaded, name, None) if loaded else None
    return isinstance(cls, type) and isinstance(error, cls)


def _unknown(error: BaseException) -> str:
    """An error of no known kind: its type and message."""
    return f"{type(error).__name__}: {_joined(str(error))}"


def _joined(text: str) -> str:
    """A multi-line message of unknown shape as one line: its lines joined."""
    return _first_line(" ".join(line.strip() for line in text.splitlines()))


def _first_line(text: str, limit: int | None = MAX_LENGTH) -> str:
    line = next((line.strip() for line in ANSI.sub("", text).splitlines() if line.strip()), "(no message)")
    return line if limit is None or len(line) <= limit else line[: limit - 3] + "..."


def _settings() -> Settings | None:
    try:
        return load_settings()
    except ConfigError:
        return None
