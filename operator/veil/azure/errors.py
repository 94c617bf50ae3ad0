"""What Veil's Azure calls share when they fail: one error shape and one reading of azure-core's."""

from __future__ import annotations

from collections.abc import Mapping

from azure.core.exceptions import HttpResponseError

# Statuses worth trying again: timeouts, throttling and the service's own failures.
RETRIABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class AzureOperationError(Exception):
    """An Azure operation failed; `str(error)` is the plain-words reason."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retriable: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retriable = retriable


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
