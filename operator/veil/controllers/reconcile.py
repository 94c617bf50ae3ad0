"""The reconcile skeleton every kind shares: validate, run the domain, write status once.

Status is written at the end of every reconcile, and only when it differs from what the
object already has, so a no-op resync issues no write.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import kopf
from pydantic import BaseModel, ValidationError

from veil import events, logs
from veil.conditions import Outcome, Status, apply_outcome, now_rfc3339, set_condition
from veil.events import Event
from veil.metrics import (
    ACTIVE_WORKERS,
    RECONCILE_ERRORS,
    RECONCILE_TIME,
    RECONCILE_TOTAL,
    RESOURCE_READY,
    TERMINAL_RECONCILE_ERRORS,
    controller_name,
)

SpecT = TypeVar("SpecT", bound=BaseModel)


@dataclass
class Result:
    """A domain reconcile's answer: the conditions' outcome and the kind's own status fields.

    A status field set to None is removed from the object.
    """

    outcome: Outcome
    status: dict[str, Any] = field(default_factory=dict)
    requeue_after: float | None = None
    # Kind-specific conditions beside Ready/Reconciling/Stalled: (type, status, reason, message).
    conditions: list[tuple[str, Status, str, str]] = field(default_factory=list)
    # What the conditions leave out (an SDK's whole error text): for the log and the event.
    detail: str = ""


DomainFn = Callable[[SpecT, Mapping[str, Any], Any], Awaitable[Result]]


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem, each naming the field by its wire path."""
    lines = []
    for problem in error.errors():
        path = ".".join(str(part) for part in problem["loc"]) or "spec"
        lines.append(f"spec.{path}: {problem['msg']}")
    return "; ".join(lines)


def status_patch(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that turns `current` status into `desired`; empty when they agree.

    A key of `desired` set to None is removed. Nested objects are diffed the same way and keys
    they no longer have are removed (RFC 7386 merges objects, so a plain copy would keep
    them: a sealed ledger must be stored exactly as it was sealed). Other top-level keys of
    `current` are left alone.
    """
    patch: dict[str, Any] = {}
    for key, value in desired.items():
        if value is None:
            if key in current:
                patch[key] = None
        elif current.get(key) != value:
            old = current.get(key)
            patch[key] = _object_patch(old, value) if isinstance(old, Mapping) else value
    return patch


def _object_patch(current: Mapping[str, Any], desired: Any) -> Any:
    if not isinstance(desired, Mapping):
        return desired
    patch: dict[str, Any] = {key: None for key in current if key not in desired}
    for key, value in desired.items():
        old = current.get(key)
        if old != value:
            patch[key] = _object_patch(old, value) if isinstance(old, Mapping) else value
    return patch


@dataclass
class Evaluation:
    """A finished reconcile: the status merge patch to write, and whether to try again."""

    status_patch: dict[str, Any]
    retry_in: float | None = None
    retry_reason: str = ""
    error: Exception | None = None
    # Condition transitions, to record once the status patch is written.
    events: list[Event] = field(default_factory=list)

    def record_events(self, obj: Mapping[str, Any]) -> None:
        """Post the transitions' events on `obj`. Blocking: call from a worker thread."""
        events.record_all(obj, self.events)


BlockingDomainFn = Callable[[SpecT, Mapping[str, Any], Any], Result]


def _failure(kind: str, failure: Exception, logger: Any) -> tuple[Result, Exception | None]:
    """The Result a failed domain call leaves, and the error to retry on (None: don't)."""
    if isinstance(failure, kopf.PermanentError):
        stalled = Outcome.stalled_with("ReconcileFailed", first_line(str(failure), 400))
        return Result(stalled, detail=str(failure)), None
    logger.exception("reconcile of %s failed", kind)
    return (
        Result(Outcome.failed("ReconcileError", failure_message(failure)), detail=str(failure)),
        failure,
    )


def failure_message(failure: Exception, limit: int = 180) -> str:
    """One or two sentences for a condition: what failed, that it is retried, where the rest
    is. Only the first line of the error: SDK errors carry whole responses and tracebacks."""
    first = first_line(str(failure), limit)
    what = f"{type(failure).__name__}: {first}" if first else type(failure).__name__
    return (
        f"Reconcile failed and will be retried ({what}). Details are in the operator's log "
        "and the object's events."
    )


def first_line(text: str, limit: int = 200) -> str:
    """The first line of `text`, at most `limit` characters: what a condition can hold of an
    error whose whole text (an SDK's, a credential chain's) belongs in logs and events."""
    lines = text.strip().splitlines()
    first = lines[0].strip() if lines else ""
    if len(first) > limit:
        first = first[: limit - 1] + "…"
    return first


def _invalid(
    spec_model: type[SpecT], body: Mapping[str, Any]
) -> tuple[SpecT | None, Result | None]:
    try:
        return spec_model.model_validate(dict(body.get("spec") or {})), None
    except ValidationError as invalid:
        # The CRD should have refused this; an older CRD may not have. Nothing to retry.
        return None, Result(Outcome.stalled_with("InvalidSpec", describe_validation_error(invalid)))


async def evaluate(
    *,
    kind: str,
    spec_model: type[SpecT],
    body: Mapping[str, Any],
    domain: DomainFn[SpecT],
    logger: Any,
) -> Evaluation:
    """Validate, run the domain, and compute the status patch; never raises for the domain."""
    started = time.monotonic()
    spec, result = _invalid(spec_model, body)
    error: Exception | None = None
    if spec is not None:
        with working(kind):
            try:
                result = await domain(spec, body, logger)
            except Exception as failure:  # every failure is said in status
                result, error = _failure(kind, failure, logger)
    assert result is not None
    return conclude(kind, body, result, error=error, started=started, logger=logger)


def evaluate_blocking(
    *,
    kind: str,
    spec_model: type[SpecT],
    body: Mapping[str, Any],
    domain: BlockingDomainFn[SpecT],
    logger: Any,
) -> Evaluation:
    """`evaluate` for a blocking domain, run from a worker thread."""
    started = time.monotonic()
    spec, result = _invalid(spec_model, body)
    error: Exception | None = None
    if spec is not None:
        with working(kind):
            try:
                result = domain(spec, body, logger)
            except Exception as failure:  # every failure is said in status
                result, error = _failure(kind, failure, logger)
    assert result is not None
    return conclude(kind, body, result, error=error, started=started, logger=logger)


@contextlib.contextmanager
def working(kind: str) -> Iterator[None]:
    """controller_runtime_active_workers while a domain reconcile runs."""
    gauge = ACTIVE_WORKERS.labels(controller_name(kind))
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


def conclude(
    kind: str,
    body: Mapping[str, Any],
    result: Result,
    *,
    error: Exception | None,
    started: float,
    logger: Any,
) -> Evaluation:
    """The status patch `result` asks for against `body`'s status, its events, and metrics."""
    meta = body.get("metadata", {})
    generation = int(meta.get("generation", 0))
    current_status: Mapping[str, Any] = body.get("status") or {}
    desired = dict(result.status)
    desired["observedGeneration"] = generation
    # set_condition keeps an unchanged condition's timestamp, so an unchanged outcome
    # yields an empty patch.
    now = now_rfc3339()
    before = current_status.get("conditions", [])
    conditions = apply_outcome(before, result.outcome, generation, now)
    for type_, status, reason, message in result.conditions:
        conditions = set_condition(
            conditions,
            type_,
            status=status,
            reason=reason,
            message=message,
            generation=generation,
            now=now,
        )
    desired["conditions"] = conditions
    controller = controller_name(kind)
    RECONCILE_TIME.labels(controller).observe(time.monotonic() - started)
    RESOURCE_READY.labels(kind, meta.get("namespace", ""), meta.get("name", "")).set(
        1.0 if result.outcome.ready == "True" else 0.0
    )
    evaluation = Evaluation(
        status_patch(current_status, desired),
        error=error,
        events=events.transitions(
            before, conditions, ready_warning=result.outcome.warning, detail=result.detail
        ),
    )
    if evaluation.status_patch:
        logger.debug("status change of %s %s: %s", kind, meta.get("name"), evaluation.status_patch)
    if result.detail and error is None:
        # What status leaves out; a failure with a traceback was logged where it was caught.
        logger.warning("%s %s", result.outcome.message, result.detail)
    result_label = "success"
    if error is not None:
        RECONCILE_ERRORS.labels(controller).inc()
        result_label = "error"
        # kopf keeps a retry's reason in the object's annotations: its first line only.
        evaluation.retry_in, evaluation.retry_reason = 30, first_line(str(error))
    elif result.outcome.reason in ("InvalidSpec", "ReconcileFailed"):
        # Nothing to retry until the object changes: controller-runtime's TerminalError.
        RECONCILE_ERRORS.labels(controller).inc()
        TERMINAL_RECONCILE_ERRORS.labels(controller).inc()
        result_label = "error"
    elif result.requeue_after is not None:
        result_label = "requeue_after"
        evaluation.retry_in = result.requeue_after
        evaluation.retry_reason = result.outcome.message or "requeue"
    RECONCILE_TOTAL.labels(controller, result_label).inc()
    return evaluation


async def reconcile(
    *,
    kind: str,
    spec_model: type[SpecT],
    body: kopf.Body,
    patch: kopf.Patch,
    domain: DomainFn[SpecT],
    logger: Any,
) -> None:
    """The kopf-handler form: status goes into kopf's patch; retries become TemporaryError.
    The transitions' events are posted here, just before kopf writes the patch."""
    meta = body.get("metadata", {})
    logs.start(kind, meta.get("namespace", ""), meta.get("name", ""))
    evaluation = await evaluate(
        kind=kind, spec_model=spec_model, body=body, domain=domain, logger=logger
    )
    for key, value in evaluation.status_patch.items():
        patch.status[key] = value
    if evaluation.events:
        await asyncio.to_thread(evaluation.record_events, body)
    if evaluation.retry_in is not None:
        raise kopf.TemporaryError(evaluation.retry_reason, delay=evaluation.retry_in)


@contextlib.contextmanager
def observed(kind: str) -> Iterator[None]:
    """Count and time a reconcile that does not go through `evaluate`."""
    controller = controller_name(kind)
    started = time.monotonic()
    try:
        with working(kind):
            yield
    except Exception:
        RECONCILE_ERRORS.labels(controller).inc()
        RECONCILE_TOTAL.labels(controller, "error").inc()
        raise
    finally:
        RECONCILE_TIME.labels(controller).observe(time.monotonic() - started)
    RECONCILE_TOTAL.labels(controller, "success").inc()


def forget(kind: str, body: kopf.Body) -> None:
    """Drop a deleted object's per-object series."""
    meta = body.get("metadata", {})
    try:
        RESOURCE_READY.remove(kind, meta.get("namespace", ""), meta.get("name", ""))
    except KeyError:
        return
