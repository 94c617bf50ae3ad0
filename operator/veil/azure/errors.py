"""What Veil's Azure calls share when they fail: one error shape and one reading of azure-core's."""

from __future__ import annotations

import math
from collections.abc import Mapping

from azure.core.exceptions import AzureError, HttpResponseError
from azure.core.pipeline.policies import RetryPolicy

# Statuses worth trying again: timeouts, throttling and the service's own failures.
RETRIABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# The wait before trying again when the service named none: the SDK has already retried
# (azure-core's RetryPolicy, exponential backoff) by the time an error reaches Veil.
DEFAULT_RETRY_SECONDS = 15.0
# azure-core reads Retry-After (seconds or an HTTP date) and Azure's millisecond variants.
_MS_HEADERS = ("retry-after-ms", "x-ms-retry-after-ms")


class AzureOperationError(Exception):
    """An Azure operation failed. `str(error)` is the plain-words reason, one or two sentences
    fit for a status condition; `detail` is the service's or the SDK's whole text (a
    credential chain's runs to dozens of lines), for the log and the object's events."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retriable: bool = False,
        detail: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retriable = retriable
        self.detail = detail
        # Seconds to wait before trying again (the service's Retry-After when it gave one).
        if retry_after is None and retriable:
            retry_after = DEFAULT_RETRY_SECONDS
        self.retry_after = retry_after


def brief(text: str, limit: int = 160) -> str:
    """The first line of a service's or SDK's error text, at most `limit` characters."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    first = lines[0] if lines else "no details"
    if len(first) > limit:
        first = first[: limit - 1] + "…"
    return first


def error_code(error: HttpResponseError) -> str | None:
    """The service's error code, with the inner code when there is one (`Forbidden/...`)."""
    inner = getattr(error, "error", None)
    code = getattr(inner, "code", None)
    inner_error = getattr(inner, "innererror", None)
    if isinstance(inner_error, Mapping) and isinstance(inner_error.get("code"), str):
        return f"{code}/{inner_error['code']}" if code else str(inner_error["code"])
    return code if isinstance(code, str) else None


def service_message(error: HttpResponseError) -> str:
    inner = getattr(error, "error", None)
    message = getattr(inner, "message", None)
    if isinstance(message, str) and message:
        return message
    return str(error.message or error.reason or "no details")


def retry_after(error: AzureError) -> float | None:
    """The wait the service asked for in its answer's Retry-After header (or Azure's
    millisecond variants), in seconds; None when it named none."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    parse = RetryPolicy().parse_retry_after  # azure-core's own reading of the header
    lowered = {str(key).lower(): str(value) for key, value in headers.items()}
    try:
        if lowered.get("retry-after"):
            return parse(lowered["retry-after"])
        for header in _MS_HEADERS:
            if lowered.get(header):
                return parse(lowered[header]) / 1000.0
    except ValueError:
        return None
    return None


def waiting(service: str, why: str, seconds: float, where: str) -> str:
    """The one-line condition for a transient failure Veil waits out, e.g. `waiting for Key
    Vault (throttled), retrying in 2 s (reading key 'k' in https://...)`."""
    return f"waiting for {service} ({why}), retrying in {math.ceil(seconds)} s ({where})"


def transient_wait(error: AzureError) -> float:
    """Seconds to wait after a transient failure: the service's Retry-After, else the default
    (never 0: a requeue at once would hammer a service that asked for restraint)."""
    asked = retry_after(error)
    return max(1.0, asked) if asked is not None else DEFAULT_RETRY_SECONDS
