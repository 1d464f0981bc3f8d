"""What the real API accepts and answers, as the local feed imitates it: paths, paging limits, the daily
quota, and its errors. The paths are the pipeline client's own (`trafficwatch.config`, which
`trafficwatch.source` asks)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from trafficwatch import config

EXPORTS_PATH = config.EXPORTS_PATH
RECORDS_PATH = config.RECORDS_PATH
V1_PATH = config.V1_PATH.rstrip("/")  # routes are matched without their trailing slash
V2_PREFIX = "/api/explore/v2.1/catalog/datasets/"

RECORDS_MAX_LIMIT = 100
RECORDS_DEFAULT_LIMIT = 10
V1_MAX_ROWS = 10_000
V1_DEFAULT_ROWS = 10
MAX_WINDOW = 10_000  # offset + limit (v2.1) and start + rows (v1) may not go beyond this
CALL_LIMIT = 10_000  # daily quota advertised in X-RateLimit-Limit and in the 429 body

JSON_TYPE = "application/json; charset=utf-8"
HTML_TYPE = "text/html; charset=utf-8"


def next_midnight_utc(now: datetime | None = None) -> datetime:
    now = now or datetime.now(UTC)
    return datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)


class ApiError(Exception):
    """An error answered as JSON in the style of the API family that raised it."""

    def __init__(self, status: int, message: str, error_code: str = "InvalidRESTParameterError") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code


def int_param(query: dict[str, str], name: str, default: int) -> int:
    text = query.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ApiError(400, f"Invalid value for {name} API parameter: {text} is not an integer.") from None


def records_window(query: dict[str, str]) -> tuple[int, int]:
    """(limit, offset) of a v2.1 records request, validated like the real API."""
    limit = int_param(query, "limit", RECORDS_DEFAULT_LIMIT)
    offset = int_param(query, "offset", 0)
    if not -1 <= limit <= RECORDS_MAX_LIMIT:
        raise ApiError(
            400,
            f"Invalid value for limit API parameter: {limit} was found but -1 <= limit <= "
            f"{RECORDS_MAX_LIMIT} is expected.",
        )
    if limit == -1:
        limit = RECORDS_MAX_LIMIT
    if offset < 0:
        raise ApiError(400, f"Invalid value for offset API parameter: {offset} was found but >= 0 is expected.")
    _check_window(offset, limit)
    return limit, offset


def exports_window(query: dict[str, str], total: int) -> tuple[int, int]:
    """Exports return everything; `limit` (-1 = all) and `offset` slice it."""
    limit = int_param(query, "limit", -1)
    offset = int_param(query, "offset", 0)
    if limit < -1 or offset < 0:
        raise ApiError(400, "Invalid value for limit or offset API parameter.")
    if offset:
        _check_window(offset, total if limit == -1 else limit)
    return offset, total if limit == -1 else offset + limit


def v1_window(query: dict[str, str]) -> tuple[int, int]:
    rows = int_param(query, "rows", V1_DEFAULT_ROWS)
    start = int_param(query, "start", 0)
    if not 0 <= rows <= V1_MAX_ROWS or start < 0 or start + rows > MAX_WINDOW:
        raise ApiError(400, f"Invalid value for rows or start parameter: rows must be within 0..{V1_MAX_ROWS}.")
    return rows, start


def _check_window(offset: int, limit: int) -> None:
    if offset + limit > MAX_WINDOW:
        raise ApiError(
            400,
            f"Invalid value for sum of offset + limit API parameter: {offset + limit} was found but "
            f"<= {MAX_WINDOW} is expected.",
        )


# --------------------------------------------------------------------------------------------------
# Entry points
