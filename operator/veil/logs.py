"""Log formats shared by the operator and the programs its pods run: text, or one JSON object a
line in the shape kopf's JSON formatter writes (`message`, `timestamp`, `severity`, `object`)
plus `logger` and, inside a reconcile, `reconcile_id`.

The format comes from `--log-format` or `VEIL_LOG_FORMAT` (`text` when neither is set). The
operator passes its own format on to the pods and Jobs it renders through the same variable.
Standard library only: the runtime, synthesizer and trainer import it too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, cast

ENV = "VEIL_LOG_FORMAT"
FORMATS = ("text", "json")
LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# The key kopf's JSON formatter puts the object reference under (its default refkey).
OBJECT_KEY = "object"


def resolve_format(flag: str | None = None, env: Mapping[str, str] | None = None) -> LogFormat:
    """The flag if given, else VEIL_LOG_FORMAT, else text; ValueError for anything else."""
    value = (flag or (os.environ if env is None else env).get(ENV) or "text").strip().lower()
    if value not in FORMATS:
        raise ValueError(f"log format {value!r} is not one of {', '.join(FORMATS)} ({ENV})")
    return cast(LogFormat, value)


@dataclass(frozen=True)
class Reconcile:
    """The object one reconcile is about, and the id its log lines share."""

    kind: str
    namespace: str
    name: str
    id: str

    def ref(self) -> dict[str, str]:
        return {"kind": self.kind, "namespace": self.namespace, "name": self.name}


_current: ContextVar[Reconcile | None] = ContextVar("veil_reconcile", default=None)


def current() -> Reconcile | None:
    return _current.get()


def _new(kind: str, namespace: str, name: str) -> Reconcile:
    return Reconcile(kind, namespace, name, uuid.uuid4().hex[:16])


def start(kind: str, namespace: str, name: str) -> Reconcile:
    """Begin a reconcile of the object and leave it set in this context: for a kopf async
    handler, so that the lines kopf logs about the handler's outcome (after it returns, in the
    same task) carry its id too. kopf runs each object's handlers in a task of that object's
    own, where the next start replaces it."""
    reconcile = _new(kind, namespace, name)
    _current.set(reconcile)
    return reconcile


@contextlib.contextmanager
def reconciling(kind: str, namespace: str, name: str) -> Iterator[Reconcile]:
    """Every line logged inside (in this task, or the threads it starts with
    asyncio.to_thread) names the object and carries the reconcile id: the one a handler
    started for the same object, else a new one."""
    current = _current.get()
    if current is not None and (current.kind, current.namespace, current.name) == (
        kind,
        namespace,
        name,
    ):
        yield current
        return
    reconcile = _new(kind, namespace, name)
    token = _current.set(reconcile)
    try:
        yield reconcile
    finally:
        _current.reset(token)


class ContextFilter(logging.Filter):
    """Adds `logger`, and inside a reconcile `reconcile_id` and the object reference (kopf's
    `k8s_ref`, which its formatters print) where the line has none of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.setdefault("logger", record.name)
        reconcile = _current.get()
        if reconcile is not None:
            record.__dict__.setdefault("reconcile_id", reconcile.id)
            record.__dict__.setdefault("k8s_ref", reconcile.ref())
        return True


def _severity(level: int) -> str:
    # As kopf's ObjectJsonFormatter names them.
    if level <= logging.DEBUG:
        return "debug"
    if level <= logging.INFO:
        return "info"
    if level <= logging.WARNING:
        return "warn"
    return "error" if level <= logging.ERROR else "fatal"


class JsonFormatter(logging.Formatter):
    """kopf's JSON line shape without kopf (the pods' programs do not import it)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "message": record.getMessage(),
            "logger": record.name,
            "timestamp": datetime.fromtimestamp(record.created, tz=UTC).isoformat(),
        }
        reconcile_id = getattr(record, "reconcile_id", None)
        if reconcile_id is not None:
            line["reconcile_id"] = reconcile_id
        ref = getattr(record, "k8s_ref", None)
        if ref is not None:
            line[OBJECT_KEY] = ref
        line["severity"] = _severity(record.levelno)
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def _handler(formatter: logging.Formatter) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(ContextFilter())
    return handler


def json_enabled() -> bool:
    """Whether the process logs JSON lines (configure_program or configure_operator chose
    json): a program's own output then keeps to one line per document."""
    return any(
        isinstance(handler.formatter, JsonFormatter) or "Json" in type(handler.formatter).__name__
        for handler in logging.getLogger().handlers
    )


def configure_program(log_format: str | None = None, level: int | str = logging.INFO) -> None:
    """Logging for a program a pod runs (runtime, synthesizer, trainer): the format from
    VEIL_LOG_FORMAT unless given. Leaves logging alone when something configured it already."""
    root = logging.getLogger()
    if root.handlers:
        return
    fmt = resolve_format(log_format)
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    root.addHandler(_handler(formatter))
    root.setLevel(level)
    logging.captureWarnings(True)  # Python's warnings as log lines of the same format


def configure_operator(log_format: LogFormat, level: int | str = logging.INFO) -> None:
    """The operator's logging: kopf's own formatters (JSON with the object under `object`;
    text prefixed with `[namespace/name]`), with the reconcile context on every line."""
    import kopf

    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    json_lines = log_format == "json"
    kopf.configure(
        log_format=kopf.LogFormat.JSON if json_lines else kopf.LogFormat.FULL,
        log_prefix=not json_lines,
        log_refkey=OBJECT_KEY,
    )
    for handler in root.handlers:
        handler.addFilter(ContextFilter())
    root.setLevel(level)
    logging.captureWarnings(True)  # Python's warnings as log lines of the same format
