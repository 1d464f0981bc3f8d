"""The Opendatasoft client for Rennes real-time traffic: HTTP, retries within a time budget, paging.

The client keeps the bytes it received so landing can store them unchanged; a paged read is kept as a
JSON array of the page bodies, each byte for byte. `payloads` normalizes them, whatever their shape.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import requests
import tenacity

from trafficwatch.config import DATASET, EXPORTS_PATH, RECORDS_PATH, V1_PATH, Settings
from trafficwatch.payloads import Snapshot, SourceError, normalize_payload, parse_datetime, parse_json, raw_records

log = logging.getLogger(__name__)

USER_AGENT = "TrafficWatch/0.1 (open-source road traffic lakehouse; python-requests)"
PAGE_LIMIT = 100  # the records endpoint refuses more
PAGING_WINDOW = 10_000  # offset + limit must stay within this
V1_ROWS = 10_000


@dataclass(frozen=True)
class KnownSnapshot:
    """What a paged read returns when its first page shows a snapshot the caller already has."""

    measured_at: datetime


@dataclass(frozen=True)
class FetchedSnapshot:
    payload: bytes  # exactly what the API sent (paged modes: the page bodies in one JSON array)
    mode: str
    source_url: str
    fetched_at: datetime
    snapshot: Snapshot
    requests_made: int = 1
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha256", hashlib.sha256(self.payload).hexdigest())

    @property
    def record_count(self) -> int:
        return self.snapshot.record_count


def _retry_after_s(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _gist(body: bytes, limit: int = 120) -> str:
    """What an error body says, in one short line: an API's error message or an HTML page's title."""
    text = body.decode("utf-8", "replace")
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        document = None
    if isinstance(document, dict):
        text = str(document.get("error") or document.get("message") or text)
    elif title := re.search(r"<title>(.*?)</title>", text, re.IGNORECASE | re.DOTALL):
        text = title.group(1)
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "")


class Client:
    """Fetches whole snapshots; retries what is worth retrying within a time budget."""

    def __init__(self, settings: Settings, session: requests.Session | None = None) -> None:
        self.settings = settings
        self.session = session or requests.Session()
        self.session.headers.setdefault("User-Agent", USER_AGENT)
        self.session.headers["User-Agent"] = USER_AGENT
        self.session.headers["Accept"] = "application/json"
        self.requests_made = 0
        self._deadline = 0.0

    # The one public entry point.
    def fetch(self, skip_if: Callable[[datetime], bool] | None = None) -> FetchedSnapshot | KnownSnapshot:
        """Fetch the current snapshot in the configured mode.

        `skip_if(measured_at)` lets a paged read stop after its first page when that snapshot is already
        known (it returns a KnownSnapshot then): an unchanged poll costs one call instead of ~29.
        """
        self._deadline = time.monotonic() + self.settings.fetch_budget_s
        self.requests_made = 0
        fetched_at = datetime.now(UTC)
        mode = self.settings.api_mode
        if mode == "exports":
            url = self.settings.api_url + EXPORTS_PATH
            payload = self._get(url, {}).content
        elif mode == "v1":
            url = self.settings.api_url + V1_PATH
            payload = self._get(url, {"dataset": DATASET, "rows": V1_ROWS, "start": 0}).content
        else:
            url = self.settings.api_url + RECORDS_PATH
            pages = self._pages(url, skip_if)
            if isinstance(pages, KnownSnapshot):
                return pages
            payload = b"[" + b",".join(pages) + b"]"
        snapshot = normalize_payload(payload)
        log.info(
            "fetched %d records of snapshot %s in %s mode (%d requests)",
            snapshot.record_count,
            snapshot.upstream_datetime,
            mode,
            self.requests_made,
        )
        return FetchedSnapshot(
            payload=payload,
            mode=mode,
            source_url=url,
            fetched_at=fetched_at,
            snapshot=snapshot,
            requests_made=self.requests_made,
        )

    def _pages(self, url: str, skip_if: Callable[[datetime], bool] | None) -> list[bytes] | KnownSnapshot:
        pages: list[bytes] = []
        offset, total, first_datetime = 0, None, None
        while total is None or offset < total:
            if offset + PAGE_LIMIT > PAGING_WINDOW:
                raise SourceError(
                    f"records paging cannot read past {PAGING_WINDOW} records (total_count {total}); "
                    "use TRAFFICWATCH_API_MODE=exports"
                )
            params = {"limit": PAGE_LIMIT, "offset": offset, "order_by": "predefinedlocationreference"}
            response = self._get(url, params)
            page = parse_json(response.content, f"page at offset {offset}")
            records, shape, announced = raw_records(page)
            if shape != "records":
                raise SourceError(f"not the expected payload shape: page at offset {offset} is not a records page")
            if total is None:
                total = announced
                if records and isinstance(records[0], dict):
                    first_datetime = records[0].get("datetime")
                    try:
                        measured_at = parse_datetime(first_datetime) if first_datetime else None
                    except SourceError as error:
                        raise SourceError(error.reason, response.content) from None
                    if skip_if and measured_at and skip_if(measured_at):
                        log.info("snapshot %s is already landed: stopped after page 1", first_datetime)
                        return KnownSnapshot(measured_at)
            elif announced != total:
                raise SourceError(
                    f"inconsistent snapshot: total_count changed from {total} to {announced} while paging",
                    response.content,
                )
            pages.append(response.content)
            if not records:
                break
            offset += len(records)
            self._check_rate_budget(response, pages_left=-(-(total - offset) // PAGE_LIMIT))
        return pages

    def _check_rate_budget(self, response: requests.Response, pages_left: int) -> None:
        """Stop a paged read that the quota cannot finish, rather than burn calls on a partial snapshot."""
        remaining = response.headers.get("X-RateLimit-Remaining")
        if remaining is None or not remaining.strip().isdigit() or pages_left <= 0:
            return
        if int(remaining) < pages_left:
            reset = response.headers.get("X-RateLimit-Reset", "unknown")
            raise SourceError(
                f"rate limit: X-RateLimit-Remaining={remaining} but {pages_left} pages still to read "
                f"(resets at {reset})"
            )

    def _get(self, url: str, params: dict[str, Any]) -> requests.Response:
        """GET `url`, tried up to `http_attempts` times: a failure worth retrying (`_request` says) is tried
        again after its wait (a jittered exponential backoff, or Retry-After on a 429), while the next try still
        fits in the fetch budget. A failure not worth retrying, or the last one, raises its SourceError."""
        attempts = max(1, self.settings.http_attempts)
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(lambda error: isinstance(error, _Retryable) and error.wait_s is not None),
            wait=lambda state: _failure(state).wait_s or 0.0,
            stop=tenacity.stop_after_attempt(attempts) | self._past_budget,
            before_sleep=lambda state: _log_retry(state, attempts),
            retry_error_callback=lambda state: self._given_up(state, attempts),
        )
        try:
            return retrying(self._attempt, url, params)
        except _Retryable as failure:  # not worth retrying
            raise failure.error from None

    def _attempt(self, url: str, params: dict[str, Any]) -> requests.Response:
        remaining_s = self._deadline - time.monotonic()
        if remaining_s <= 0:
            raise SourceError(f"fetch budget of {self.settings.fetch_budget_s:.0f} s spent before {url}")
        return self._request(url, params, timeout_s=min(self.settings.http_timeout_s, remaining_s))

    def _past_budget(self, state: tenacity.RetryCallState) -> bool:
        """Whether the wait before the next try would pass the fetch budget."""
        return state.upcoming_sleep > self._deadline - time.monotonic()

    def _given_up(self, state: tenacity.RetryCallState, attempts: int) -> requests.Response:
        error = _failure(state).error
        if state.attempt_number >= attempts:
            raise SourceError(f"{error.reason} (after {state.attempt_number} attempts)", error.body)
        raise SourceError(
            f"{error.reason}; the next try in {state.upcoming_sleep:.0f} s would pass the fetch budget", error.body
        )

    def _request(self, url: str, params: dict[str, Any], timeout_s: float) -> requests.Response:
        """One GET. Failures raise _Retryable, with the wait before the next try (None: do not retry)."""
        backoff_s = random.uniform(0.5, 1.0) * min(8.0, 2.0**self.requests_made)  # exponential, jittered
        self.requests_made += 1
        try:
            response = self.session.get(url, params=params, timeout=(min(5.0, timeout_s), timeout_s))
        except requests.Timeout:
            raise _Retryable(SourceError(f"timeout after {timeout_s:.0f} s: GET {url}"), backoff_s) from None
        except requests.ConnectionError as exc:
            error = SourceError(f"connection failed: GET {url}: {type(exc).__name__}")
            raise _Retryable(error, backoff_s) from None
        status = response.status_code
        if status == 200:
            content_type = response.headers.get("Content-Type", "")
            if "json" in content_type.lower():
                return response
            error = SourceError(
                f"not JSON: HTTP 200 with Content-Type {content_type or 'none'} "
                f"({_gist(response.content)!r}) from {url}",
                response.content,
            )
            raise _Retryable(error, None)
        if status == 429:
            retry_after = _retry_after_s(response)
            limits = f"Retry-After {response.headers.get('Retry-After', 'absent')}, X-RateLimit-Remaining "
            limits += response.headers.get("X-RateLimit-Remaining", "absent")
            reason = f"HTTP 429 rate limited ({limits}) from {url}: {_gist(response.content)}"
            error = SourceError(reason, response.content)
            raise _Retryable(error, backoff_s if retry_after is None else retry_after + random.uniform(0, 0.5))
        error = SourceError(f"HTTP {status} from {url}: {_gist(response.content)}", response.content)
        raise _Retryable(error, backoff_s if status >= 500 or status == 408 else None)


def _log_retry(state: tenacity.RetryCallState, attempts: int) -> None:
    reason = _failure(state).error.reason
    log.warning("%s; retry %d of %d in %.1f s", reason, state.attempt_number, attempts - 1, state.upcoming_sleep)


def _failure(state: tenacity.RetryCallState) -> _Retryable:
    """The failure of the attempt that just ended (only _Retryable ones are retried)."""
    assert state.outcome is not None
    error = state.outcome.exception()
    assert isinstance(error, _Retryable)
    return error


class _Retryable(Exception):
    def __init__(self, error: SourceError, wait_s: float | None) -> None:
        super().__init__(error.reason)
        self.error = error
        self.wait_s = wait_s
