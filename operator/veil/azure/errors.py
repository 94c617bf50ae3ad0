"""What Veil's Azure calls share when they fail: one error shape and one reading of azure-core's."""

from __future__ import annotations

from collections.abc import Mapping

from azure.core.exceptions import HttpResponseError

# Statuses worth trying again: timeouts, throttling and the service's own failures.
RETRIABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retriable = retriable
        self.detail = detail


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
